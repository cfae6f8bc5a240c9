"""A fake neuron speaking the real lifecycle and inference APIs, with fault injection, for fleet
tests of the gateway; plus `running()`, which serves any ASGI app under a real uvicorn in the
test's own event loop (so tests can gate the fake with asyncio events)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cortex.core.catalogue import ModelSpec
from cortex.core.errors import (
    CapacityExhausted,
    CortexError,
    DeviceUnhealthy,
    InvalidRequest,
    ModelBusy,
    ModelNotFound,
    NeuronUnavailable,
    Overloaded,
    QueueTimeout,
    Shortfall,
    ShuttingDown,
    Unauthorized,
)
from cortex.core.fleet import (
    DeviceStatus,
    LoadedModel,
    LoadRequest,
    ModelListing,
    ModelState,
    NeuronStatus,
    UnloadRequest,
)
from cortex.core.protocol.errors import error_headers, openai_error
from cortex.core.protocol.openai import TokenizeResponse

GiB = 2**30

FailMode = Literal["503", "500", "cut"]


@dataclass
class FakeModel:
    id: str
    memory: int
    kind: Literal["chat", "embedding"] = "chat"
    state: ModelState = ModelState.READY
    in_flight: int = 0
    last_used: float | None = None
    loaded_at: float | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    unloaded: asyncio.Event = field(default_factory=asyncio.Event)  # an unload ended its load
    error: str | None = None  # why a FAILED model failed
    source: str | None = None  # the load's source; None: the catalogue's, file:/fake/<id>

    def view(self) -> LoadedModel:
        return LoadedModel(
            id=self.id,
            source=self.source or f"file:/fake/{self.id}",
            kind=self.kind,
            state=self.state,
            devices=["cpu-0"],
            memory_bytes=self.memory,
            context_length=4096,
            in_flight=self.in_flight,
            last_used=self.last_used,
            loaded_at=self.loaded_at,
            progress=1.0 if self.state == ModelState.READY else 0.5,
            error=self.error,
        )


@dataclass
class Faults:
    """Knobs a test turns; each describes what the neuron does from now on."""

    fail_requests: int = 0  # the next N inference requests fail before their first byte
    fail_mode: FailMode = "503"
    die_after: int | None = None  # streams die after this many content chunks
    die_with_error_event: bool = False  # ...sending an error event and [DONE] (the real neuron's
    # way for a generation that fails), instead of dropping the connection
    hold: asyncio.Event | None = (
        None  # inference waits here after its first chunk / before answering
    )
    load_gate: asyncio.Event | None = None  # loads wait here before becoming ready
    load_error: str | None = None  # loads fail with this message
    busy: bool = False  # inference answers 429 overloaded
    shutting_down: bool = False  # inference answers 503 shutting_down
    queue_timeout: float | None = None  # inference waits this long, then answers 429 queue_timeout
    reject: str | None = None  # inference answers 400 invalid_request with this message
    unhealthy: bool = False  # /status reports unhealthy
    status_gate: asyncio.Event | None = None  # /status answers wait here


class FakeNeuron:
    """One fake neuron; `app` is its ASGI app, the lists record what the gateway asked of it."""

    def __init__(
        self,
        name: str,
        *,
        memory: int = 8 * GiB,
        available: dict[str, int] | None = None,
        loaded: dict[str, int] | None = None,
        admin_token: str | None = None,
        reply: str | None = None,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.aliases = dict(aliases or {})  # alias -> model id, resolved by loads as a neuron does
        self.memory = memory
        self.available = dict(available or {})
        self.admin_token = admin_token
        self.reply = reply or f"Hello from {name}."
        self.models: dict[str, FakeModel] = {}
        for model, size in (loaded or {}).items():
            self.models[model] = self._ready(FakeModel(model, size, loaded_at=time.time()))
        self.faults = Faults()
        self.loads: list[LoadRequest] = []
        self.unloads: list[str] = []
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.status_calls = 0  # /status requests received (answered or waiting)
        self.status_answers = 0  # /status requests past the gate, answered
        self.disconnects = 0
        self.completed_streams = 0
        self.admin_headers: list[str | None] = []
        self.principals: list[str | None] = []  # x-cortex-principal of each inference request
        self.strictness: list[str | None] = []  # x-cortex-strict-max-tokens of each one
        self.caps: list[str | None] = []  # x-cortex-max-output-tokens of each one
        self.answer_headers: dict[str, str] = {}  # sent on every inference answer
        # Admission limits reported in /status (per model); None reports none.
        self.max_running: int | None = None
        self.max_queue: int | None = None
        self.app = self._build()

    # -- state helpers for tests

    @staticmethod
    def _ready(model: FakeModel) -> FakeModel:
        model.state = ModelState.READY
        model.ready.set()
        return model

    def in_flight(self) -> int:
        return sum(m.in_flight for m in self.models.values())

    def free(self) -> int:
        return self.memory - sum(m.memory for m in self.models.values())

    # -- the app

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.exception_handler(CortexError)
        async def _error(_: Request, err: CortexError) -> JSONResponse:
            return JSONResponse(openai_error(err), err.status, headers=error_headers(err))

        app.get("/health")(self._health)
        app.get("/status")(self._status)
        app.get("/models")(self._listing)
        app.post("/models/load")(self._load)
        app.post("/models/unload")(self._unload)
        app.post("/v1/chat/completions")(self._chat)
        app.post("/v1/completions")(self._completion)
        app.post("/v1/embeddings")(self._embeddings)
        app.post("/tokenize")(self._tokenize)
        return app

    async def _health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def _status(self) -> dict[str, Any]:
        self.status_calls += 1
        if self.faults.status_gate is not None:
            await self.faults.status_gate.wait()
        self.status_answers += 1
        used = self.memory - self.free()
        device = DeviceStatus(
            id="cpu-0",
            index=0,
            kind="cpu",
            name="fake cpu",
            memory_total=self.memory,
            memory_free=self.free(),
            memory_used=used,
        )
        status = NeuronStatus(
            node=self.name,
            version="fake",
            healthy=not self.faults.unhealthy,
            devices=[device],
            models=[m.view() for m in self.models.values()],
            in_flight=self.in_flight(),
            max_running=self.max_running,
            max_queue=self.max_queue,
        )
        return status.model_dump()

    async def _listing(self) -> dict[str, Any]:
        listing = ModelListing(
            loaded=[m.view() for m in self.models.values()],
            available=[
                ModelSpec(id=model, source=f"file:/fake/{model}", memory=size)
                for model, size in self.available.items()
            ],
        )
        return listing.model_dump()

    def _check_admin(self, request: Request) -> None:
        header = request.headers.get("authorization")
        self.admin_headers.append(header)
        if self.admin_token and header != f"Bearer {self.admin_token}":
            raise Unauthorized("admin token required")

    async def _load(self, request: Request) -> dict[str, Any]:
        self._check_admin(request)
        load = LoadRequest.model_validate(await request.json())
        self.loads.append(load)
        load = load.model_copy(update={"model": self.aliases.get(load.model, load.model)})
        existing = self.models.get(load.model)
        if existing is not None and existing.state != ModelState.FAILED:  # failed: try again
            await _first_set(existing.ready, existing.unloaded)
            if existing.unloaded.is_set():
                raise CortexError(f"load of {load.model!r} cancelled: unloaded while loading")
            return existing.view().model_dump()
        size = self.available.get(load.model)
        if size is None and load.source is None:
            raise ModelNotFound(f"{self.name} cannot load {load.model!r}")
        size = size if size is not None else GiB
        if size > self.free():
            raise CapacityExhausted(
                f"{load.model} needs {size}, {self.free()} free",
                memory=Shortfall(size, self.free()),
            )
        model = FakeModel(load.model, size, state=ModelState.LOADING, source=load.source)
        self.models[load.model] = model
        try:
            if self.faults.load_gate is not None:
                await _first_set(self.faults.load_gate, model.unloaded)
        except asyncio.CancelledError:
            self.models.pop(load.model, None)
            raise
        if model.unloaded.is_set():
            # The real neuron's unload cancels a load in progress: the load call fails.
            raise CortexError(f"load of {load.model!r} cancelled: unloaded while loading")
        if self.faults.load_error is not None:
            # Like a real neuron: a catalogued model stays listed as failed, an ad-hoc one goes.
            if load.model in self.available:
                model.state, model.error = ModelState.FAILED, self.faults.load_error
            else:
                self.models.pop(load.model, None)
            raise CortexError(self.faults.load_error)
        model.loaded_at = time.time()
        return self._ready(model).view().model_dump()

    async def _unload(self, request: Request) -> dict[str, Any]:
        self._check_admin(request)
        unload = UnloadRequest.model_validate(await request.json())
        model = self.models.get(unload.model)
        if model is None:
            raise ModelNotFound(f"{unload.model!r} is not loaded")
        if model.in_flight and not unload.force:
            raise ModelBusy(f"{unload.model!r} has {model.in_flight} requests in flight")
        self.unloads.append(unload.model)
        del self.models[unload.model]
        model.unloaded.set()
        return {"model": unload.model, "unloaded": True}

    # -- inference

    async def _queue(self) -> None:
        """A full admission queue: the wait, then the real neuron's refusal."""
        if self.faults.queue_timeout is not None:
            await asyncio.sleep(self.faults.queue_timeout)
            raise QueueTimeout(f"model busy: waited for a slot on {self.name}", retry_after=7)

    def _admit(self, path: str, body: dict[str, Any]) -> FakeModel:
        self.requests.append((path, body))
        faults = self.faults
        if faults.busy:
            raise Overloaded(f"{self.name} is busy", retry_after=2)
        if faults.shutting_down:
            raise ShuttingDown(f"neuron {self.name} is shutting down", retry_after=2)
        if faults.reject is not None:
            raise InvalidRequest(faults.reject, param="max_tokens")
        model = self.models.get(body.get("model", ""))
        if model is None or model.state != ModelState.READY:
            raise ModelNotFound(f"model {body.get('model')!r} is not loaded on {self.name}")
        # A stream is cut after its headers; a plain answer cannot be, so it crashes instead.
        if faults.fail_requests > 0 and (faults.fail_mode != "cut" or not body.get("stream")):
            faults.fail_requests -= 1
            if faults.fail_mode == "503":
                raise NeuronUnavailable(f"{self.name} injected failure", retry_after=1)
            raise RuntimeError(f"{self.name} injected crash")
        return model

    def _words(self) -> list[str]:
        words = self.reply.split(" ")
        return [words[0], *(" " + w for w in words[1:])]

    @staticmethod
    def _prompt_tokens(body: dict[str, Any]) -> int:
        texts = [json.dumps(m.get("content")) for m in body.get("messages", [])]
        if "prompt" in body:
            texts.append(json.dumps(body["prompt"]))
        return sum(len(t.split()) for t in texts)

    def _usage(self, body: dict[str, Any]) -> dict[str, int]:
        prompt, completion = self._prompt_tokens(body), len(self._words())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def _chat(self, request: Request) -> Response:
        return await self._generate(request, "/v1/chat/completions")

    async def _completion(self, request: Request) -> Response:
        return await self._generate(request, "/v1/completions")

    async def _generate(self, request: Request, path: str) -> Response:
        body = await request.json()
        self.principals.append(request.headers.get("x-cortex-principal"))
        self.strictness.append(request.headers.get("x-cortex-strict-max-tokens"))
        self.caps.append(request.headers.get("x-cortex-max-output-tokens"))
        model = self._admit(path, body)
        await self._queue()
        if body.get("stream"):
            return StreamingResponse(
                self._stream(model, body, path),
                media_type="text/event-stream",
                headers=self.answer_headers,
            )
        model.in_flight += 1
        try:
            if self.faults.hold is not None and not await self._held(request, self.faults.hold):
                self.disconnects += 1
                return Response(status_code=499)
        finally:
            model.in_flight -= 1
            model.last_used = time.time()
        text = "".join(self._words())
        created = int(time.time())
        if path == "/v1/completions":
            choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": "stop"}
            kind = "text_completion"
        else:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            kind = "chat.completion"
        return JSONResponse(
            {
                "id": f"chatcmpl-{self.name}",
                "object": kind,
                "created": created,
                "model": model.id,
                "choices": [choice],
                "usage": self._usage(body),
            },
            headers=self.answer_headers,
        )

    @staticmethod
    async def _held(request: Request, gate: asyncio.Event) -> bool:
        """Wait at the gate; False when the client left first (as a real neuron notices)."""
        while not gate.is_set():
            if await request.is_disconnected():
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gate.wait(), 0.05)
        return True

    async def _stream(
        self, model: FakeModel, body: dict[str, Any], path: str
    ) -> AsyncIterator[bytes]:
        faults = self.faults
        model.in_flight += 1
        finished = False
        try:
            if faults.fail_requests > 0 and faults.fail_mode == "cut":
                faults.fail_requests -= 1
                raise RuntimeError(f"{self.name} cut the stream before its first byte")
            chat = path == "/v1/chat/completions"
            base = {
                "id": f"chatcmpl-{self.name}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()),
                "model": model.id,
            }

            def frame(choices: list[dict[str, Any]], **extra: Any) -> bytes:
                return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n".encode()

            if chat:
                yield frame([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
            for sent, word in enumerate(self._words()):
                if faults.die_after is not None and sent >= faults.die_after:
                    if not faults.die_with_error_event:
                        raise RuntimeError(f"{self.name} died mid-stream")
                    error = DeviceUnhealthy(f"{self.name}: device poisoned mid-generation")
                    yield f"data: {json.dumps(openai_error(error))}\n\n".encode()
                    yield b"data: [DONE]\n\n"
                    return
                piece = {"delta": {"content": word}} if chat else {"text": word}
                yield frame([{"index": 0, **piece, "finish_reason": None}])
                if sent == 0 and faults.hold is not None:
                    await faults.hold.wait()
            last = {"delta": {}} if chat else {"text": ""}
            yield frame([{"index": 0, **last, "finish_reason": "stop"}])
            if (body.get("stream_options") or {}).get("include_usage"):
                yield frame([], usage=self._usage(body))
            yield b"data: [DONE]\n\n"
            finished = True
            self.completed_streams += 1
        finally:
            model.in_flight -= 1
            model.last_used = time.time()
            if not finished:
                self.disconnects += 1

    async def _embeddings(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        model = self._admit("/v1/embeddings", body)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        model.last_used = time.time()
        tokens = sum(len(str(i).split()) for i in inputs)
        return {
            "object": "list",
            "model": model.id,
            "data": [
                {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                for i in range(len(inputs))
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def _tokenize(self, request: Request) -> TokenizeResponse:
        """POST /tokenize {model, messages, tools}: what the real neuron is asked to provide."""
        body = await request.json()
        self._admit("/tokenize", body)
        count = self._prompt_tokens(body) + 10 * len(body.get("tools") or [])
        return TokenizeResponse(model=body["model"], count=count)


async def _first_set(*events: asyncio.Event) -> None:
    """Wait until one of `events` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


# -- serving -----------------------------------------------------------------------------------


@dataclass
class Running:
    url: str
    server: uvicorn.Server
    task: asyncio.Task[None]

    async def stop(self, *, force: bool = False) -> None:
        """Stop serving: new connections are refused from now on. `force` skips the graceful
        part (open connections, lifespan shutdown), as a crash would."""
        self.server.should_exit = True
        self.server.force_exit = force
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        if force:  # a crash also drops the connections clients keep alive
            for connection in list(self.server.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()


@asynccontextmanager
async def running(app: Any, *, lifespan: str = "off") -> AsyncIterator[Running]:
    """Serve `app` under uvicorn on a free 127.0.0.1 port in this event loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", lifespan=lifespan, timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[assignment,method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("uvicorn did not start")
        await asyncio.sleep(0.01)
    live = Running(f"http://127.0.0.1:{port}", server, task)
    try:
        yield live
    finally:
        if not task.done():
            await live.stop()
        sock.close()
