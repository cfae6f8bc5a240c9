"""A model resident on this neuron: its replica record (state, devices, memory) and, once it
serves, the `ServedModel` requests reach: tokenizer, admission, engine and grammars."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from cortex.core.catalogue import ModelSpec
from cortex.core.errors import DeviceUnhealthy, InvalidRequest, ModelNotFound
from cortex.core.fleet import LoadedModel, ModelState
from cortex.neuron import loader
from cortex.neuron.admission import ANYONE, Admission
from cortex.neuron.chat_template import render_chat
from cortex.neuron.devices import Device
from cortex.neuron.engine import Engine, EngineLoad, Sequence
from cortex.neuron.generation import Finished, GenerationEvent, SamplingParams, choice_params
from cortex.neuron.grammar import CompiledGrammar, GrammarCompiler, GrammarSpec
from cortex.neuron.logprobs import token_bytes
from cortex.neuron.prompts import require_unicode
from cortex.neuron.worker import DeviceWorker


@dataclass
class Replica:
    """A model on this neuron: its lifecycle record, and once ready its weights and engine."""

    spec: ModelSpec
    state: ModelState = ModelState.LOADING
    devices: list[Device] = field(default_factory=list)
    memory: int = 0
    progress: float = 0.0
    error: str | None = None
    loaded_at: float | None = None
    last_used: float | None = None
    served: ServedModel | None = None

    def fail_if_device_lost(self) -> None:
        """A ready replica whose device a fault poisoned is failed: it can serve nothing more,
        so routers must not pick it, and a load of its model places it again."""
        lost = [d for d in self.devices if not d.healthy]
        if self.state is ModelState.READY and lost:
            self.state = ModelState.FAILED
            self.error = f"device {lost[0].id} is unhealthy: {lost[0].error}"

    def record(self) -> LoadedModel:
        self.fail_if_device_lost()
        served = self.served
        running = served.admission.running if served else 0
        # A chat model's engine says what really runs; an embedding's requests run as admitted.
        engine = served.engine.load if served and served.engine else EngineLoad(running=running)
        return LoadedModel(
            id=self.spec.id,
            source=self.spec.source,
            kind=self.spec.kind,
            state=self.state,
            devices=[d.id for d in self.devices],
            memory_bytes=self.memory,
            context_length=served.context_length if served else self.spec.context,
            in_flight=running,
            queued=served.admission.queued if served else 0,
            batch_size=engine.running,
            kv_waiting=engine.waiting,
            preemptions=engine.preemptions,
            last_used=self.last_used,
            loaded_at=self.loaded_at,
            progress=self.progress,
            error=self.error,
        )


class ServedModel:
    """A ready model: tokenization on the caller's thread (a prompt pool thread, see prompts.py),
    every tensor op on its device worker."""

    def __init__(
        self, replica: Replica, weights: loader.LoadedWeights, worker: DeviceWorker, config: Any
    ) -> None:
        self.replica = replica
        self.id = replica.spec.id
        self.kind: Literal["chat", "embedding"] = weights.kind
        limit = replica.spec.context
        self.context_length = min(weights.context_length, limit or weights.context_length)
        # Whether a max_tokens beyond the context is a 400 (the catalogue entry's say, if any).
        self.strict_max_tokens: bool | None = replica.spec.strict_max_tokens
        self.weights = weights
        self.worker = worker
        # Rows of the token embedding: a prompt id at or past it would fail the forward.
        self.vocab_size: int = weights.model.get_input_embeddings().num_embeddings
        self.admission = Admission(
            config.max_running, config.max_queue, config.queue_timeout, config.max_per_principal
        )
        self.engine: Engine | None = None
        # Set (on the event loop) when an unload begins: requests still waiting for a slot leave.
        self.closed = False
        self._grammars: GrammarCompiler | None = None
        self._token_names: dict[int, tuple[str, bytes]] = {}
        self._grammar_lock = threading.Lock()

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        *,
        continue_final: bool = False,
        generation_prompt: bool = True,
    ) -> list[int]:
        tokenizer = self.weights.tokenizer
        text = render_chat(tokenizer, messages, tools, continue_final, generation_prompt)
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        require_unicode(text)
        return list(self.weights.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self.weights.tokenizer.decode(ids, skip_special_tokens=True))

    def token_text(self, token: int) -> str:
        """One token's text, special tokens included (logprobs name their tokens by it); part
        of a UTF-8 character shows as U+FFFD."""
        return self._named(token)[0]

    def token_bytes(self, token: int) -> bytes:
        """One token's own bytes, also where it holds part of a UTF-8 character (logprobs'
        `bytes`, which a client joins to rebuild such a character)."""
        return self._named(token)[1]

    def _named(self, token: int) -> tuple[str, bytes]:
        """Remembered: the same few thousand tokens recur."""
        named = self._token_names.get(token)
        if named is None:
            tokenizer = self.weights.tokenizer
            text = str(tokenizer.decode([token], skip_special_tokens=False))
            named = self._token_names[token] = (text, token_bytes(tokenizer, token, text))
        return named

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, principal: str = ANYONE, n: int = 1
    ) -> AsyncIterator[GenerationEvent]:
        """Stream a generation of `n` choices (each event names its choice), one admission slot
        per choice; leaving early (aclose, cancellation) cancels every sequence still running."""
        if self.kind != "chat":
            raise InvalidRequest(f"model {self.id!r} is an embedding model", param="model")
        self._check_open()
        if n > self.admission.most:
            raise InvalidRequest(
                f"n is {n}; model {self.id!r} runs at most {self.admission.most} sequences at "
                "once for one client, and each choice is one",
                param="n",
            )
        async with self.admission.slot(principal, n):
            self._check_open()  # the model may have been unloaded while this waited
            engine = self.engine
            assert engine is not None  # a chat model's, until it is closed
            self.replica.last_used = time.time()
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[GenerationEvent] = asyncio.Queue()

            def emitter(choice: int) -> Callable[[GenerationEvent], None]:
                def emit(event: GenerationEvent) -> None:
                    tagged = dataclasses.replace(event, choice=choice) if choice else event
                    loop.call_soon_threadsafe(events.put_nowait, tagged)

                return emit

            # Choice 0 leads: the others join once its prompt is in the cache (engine.py).
            sequences = [
                Sequence(prompt_ids, choice_params(params, i), emitter(i)) for i in range(n)
            ]
            leader = sequences[0]
            leader.followers = sequences[1:]
            self.worker.call_soon(lambda: engine.add(leader))
            ended: set[int] = set()
            try:
                while len(ended) < n:
                    event = await events.get()
                    if isinstance(event, Finished):
                        ended.add(event.choice)
                    yield event
            finally:
                for i, sequence in enumerate(sequences):
                    if i not in ended:
                        sequence.cancel()
                self.replica.last_used = time.time()

    async def compile_grammar(self, spec: GrammarSpec) -> tuple[CompiledGrammar, float | None]:
        """The compiled grammar (cached) and its compile seconds, None on a hit; off the loop."""
        if self.kind != "chat":
            raise InvalidRequest(
                f"model {self.id!r} is an embedding model; it cannot enforce a grammar",
                param="model",
            )
        return await asyncio.to_thread(self._grammar_compiler().compile, spec)

    def _grammar_compiler(self) -> GrammarCompiler:
        """Built on first use: converting the tokenizer for llguidance takes a second or two."""
        with self._grammar_lock:
            if self._grammars is None:
                tokenizer = self.weights.tokenizer
                key = f"{self.id}:{getattr(tokenizer, 'name_or_path', '')}:{self.vocab_size}"
                self._grammars = GrammarCompiler(tokenizer, self.vocab_size, key)
            return self._grammars

    async def embed(
        self, texts: list[str], principal: str = ANYONE
    ) -> tuple[list[list[float]], int]:
        if self.kind != "embedding":
            raise InvalidRequest(f"model {self.id!r} is not an embedding model", param="model")
        async with self.admission.slot(principal):
            self._check_open()  # the model may have been unloaded while this waited
            self.replica.last_used = time.time()
            weights, device = self.weights, self.worker.device
            return await self.worker.run(lambda: loader.embed(weights, texts, device))

    def _check_open(self) -> None:
        """ModelNotFound once unloaded (the gateway retries elsewhere); DeviceUnhealthy once its
        device is lost."""
        if self.closed:
            raise ModelNotFound(f"model {self.id!r} was unloaded")
        if not self.worker.healthy:
            raise DeviceUnhealthy(f"model {self.id!r} is on unhealthy {self.worker.device.id}")
