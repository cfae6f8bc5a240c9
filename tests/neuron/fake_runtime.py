"""A NeuronRuntime stand-in for the API tests: scripted output, one token per character, no torch."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from cortex.core.catalogue import ModelSpec
from cortex.core.config import NeuronConfig
from cortex.core.errors import (
    InvalidRequest,
    ModelBusy,
    ModelLoadFailed,
    ModelNotFound,
    NeuronUnavailable,
    Overloaded,
    ShuttingDown,
)
from cortex.core.fleet import (
    DeviceStatus,
    LoadedModel,
    LoadRequest,
    ModelListing,
    ModelState,
    NeuronStatus,
)
from cortex.neuron.generation import Finished, GenerationEvent, SamplingParams, TextDelta


@dataclass
class FakeServed:
    """A ready model whose output is `script` (one token per piece), tokens = characters."""

    id: str
    kind: Literal["chat", "embedding"] = "chat"
    context_length: int = 400
    vocab_size: int = 0x110000  # tokens are characters
    script: list[str] = field(default_factory=lambda: ["Hello", " there", "!"])
    token_delay: float = 0.0
    refuse: Exception | None = None  # raised at the first __anext__ (admission)
    finish: Literal["stop", "length", "cancelled", "error"] | None = None
    cached_tokens: int = 0
    strict_max_tokens: bool | None = None
    running: int = 0
    cancelled: int = 0
    generated: int = 0
    last_params: SamplingParams | None = None
    last_messages: list[dict[str, Any]] | None = None
    last_tools: list[dict[str, Any]] | None = None

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        *,
        continue_final: bool = False,
        generation_prompt: bool = True,
    ) -> list[int]:
        self.last_messages, self.last_tools = messages, tools
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        opened = generation_prompt and not continue_final
        return self.encode(text + ("\nassistant:" if opened else ""))

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def token_text(self, token: int) -> str:
        return chr(token)

    def token_bytes(self, token: int) -> bytes:
        return chr(token).encode()

    async def compile_grammar(self, spec: Any) -> tuple[None, None]:
        """No grammar is enforced: the script plays the constrained output."""
        return None, None

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        principal: str = "anonymous",
        n: int = 1,
    ) -> AsyncIterator[GenerationEvent]:
        """The script once per choice (`n`), one choice after the other."""
        for choice in range(n):
            async with contextlib.aclosing(self._choice(prompt_ids, params)) as events:
                async for event in events:
                    yield dataclasses.replace(event, choice=choice)

    async def _choice(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationEvent]:
        if self.refuse is not None:
            raise self.refuse
        self.running += 1
        self.last_params = params
        sent, done = 0, False
        try:
            text, reason = "", "stop"
            for piece in self.script:
                if params.max_tokens is not None and sent >= params.max_tokens:
                    reason = "length"
                    break
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                text += piece
                cut = [text.index(s) for s in params.stop if s in text]
                sent += 1
                self.generated += 1
                if cut:
                    piece = piece[: len(piece) - (len(text) - min(cut))]
                    if piece:
                        yield TextDelta(piece, sent, self.cached_tokens)
                    break
                yield TextDelta(piece, sent, self.cached_tokens)
            done = True
            yield Finished(
                self.finish or reason, len(prompt_ids), sent, self.cached_tokens, error="boom"
            )
        finally:
            self.running -= 1
            if not done:
                self.cancelled += 1

    async def embed(
        self, texts: list[str], principal: str = "anonymous"
    ) -> tuple[list[list[float]], int]:
        if self.kind != "embedding":
            raise InvalidRequest("not an embedding model")
        vectors = []
        for text in texts:
            counts = [float(text.lower().count(c)) for c in "abcdefghijklmnopqrstuvwxyz"]
            norm = math.sqrt(sum(v * v for v in counts)) or 1.0
            vectors.append([v / norm for v in counts])
        return vectors, sum(len(t) + 2 for t in texts)


class FakeRuntime:
    """The runtime's public surface over FakeServed models; loads are instant unless told otherwise."""

    def __init__(self, config: NeuronConfig | None = None) -> None:
        self.config = config or NeuronConfig.model_validate({"neuron": {"name": "fake"}})
        self.models: dict[str, FakeServed] = {}
        self.loading: set[str] = set()
        self.catalogue = [
            ModelSpec(id="tiny-chat", source="pkg:fake/tiny.gguf", aliases=["tiny"]),
            ModelSpec(id="tiny-embed", source="pkg:fake/embed", kind="embedding"),
        ]
        self.healthy = True
        self.started = self.stopped = False
        self.shutting_down = False

    def begin_shutdown(self) -> None:
        self.shutting_down = True

    def check_open(self) -> None:
        if self.shutting_down:
            raise ShuttingDown("neuron fake is shutting down", retry_after=2.0)

    def add(self, served: FakeServed) -> FakeServed:
        self.models[served.id] = served
        return served

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def _record(self, served: FakeServed) -> LoadedModel:
        return LoadedModel(
            id=served.id,
            source=f"pkg:fake/{served.id}",
            kind=served.kind,
            state=ModelState.READY,
            devices=["cpu-0"],
            memory_bytes=1000,
            context_length=served.context_length,
            in_flight=served.running,
            loaded_at=time.time(),
            progress=1.0,
        )

    def status(self) -> NeuronStatus:
        models = [self._record(m) for m in self.models.values()]
        models += [
            LoadedModel(id=m, source="pkg:fake/x", state=ModelState.LOADING, progress=0.5)
            for m in self.loading
        ]
        device = DeviceStatus(
            id="cpu-0",
            index=0,
            kind="cpu",
            name="fake cpu",
            memory_total=8000,
            memory_free=7000,
            memory_used=1000,
            healthy=self.healthy,
        )
        return NeuronStatus(
            node=self.config.neuron.name,
            version="test",
            healthy=self.healthy,
            devices=[device],
            models=models,
            in_flight=sum(m.in_flight for m in models),
        )

    def listing(self) -> ModelListing:
        return ModelListing(loaded=self.status().models, available=self.catalogue)

    async def load(self, request: LoadRequest) -> LoadedModel:
        spec = next((s for s in self.catalogue if request.model in (s.id, *s.aliases)), None)
        if spec is None and request.source is None:
            raise ModelNotFound(f"model {request.model!r} is not in the catalogue")
        if request.source == "file:/broken":
            raise ModelLoadFailed("corrupt file")
        model_id = spec.id if spec else request.model
        if not request.wait:
            self.loading.add(model_id)
            return LoadedModel(id=model_id, source="x", state=ModelState.LOADING, progress=0.1)
        kind = spec.kind if spec else "chat"
        served = self.models.get(model_id) or self.add(FakeServed(model_id, kind=kind))
        return self._record(served)

    async def unload(self, model: str, *, force: bool = False) -> None:
        served = self.models.get(model)
        if served is None:
            raise ModelNotFound(f"model {model!r} is not loaded")
        if served.running and not force:
            raise ModelBusy(f"model {model!r} has requests in flight")
        del self.models[model]

    def served(self, model: str) -> FakeServed:
        self.check_open()
        if model in self.loading:
            raise NeuronUnavailable(f"model {model!r} is still loading", retry_after=2.0)
        if model not in self.models:
            raise ModelNotFound(f"model {model!r} is not loaded")
        return self.models[model]


def overloaded() -> Overloaded:
    return Overloaded("model busy: 1 running, 0 queued", retry_after=3.0)
