"""The neuron runtime: devices and their workers, the models resident on them, loads and unloads."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from cortex.core.catalogue import (
    DEFAULT_CATALOGUE,
    ModelSpec,
    merge_catalogues,
    resolve_alias,
    unknown_model,
)
from cortex.core.config import NeuronConfig
from cortex.core.errors import (
    CapacityExhausted,
    CortexError,
    InvalidRequest,
    ModelBusy,
    ModelNotFound,
    NeuronUnavailable,
    Shortfall,
    ShuttingDown,
    SourceConflict,
)
from cortex.core.fleet import LoadedModel, LoadRequest, ModelListing, ModelState, NeuronStatus
from cortex.core.reload import differing, named_change
from cortex.core.shutdown import SHUTDOWN_RETRY_AFTER
from cortex.neuron import cpu_linear, loader, sources
from cortex.neuron.devices import Device, discover
from cortex.neuron.engine import Engine
from cortex.neuron.generation import SamplingParams
from cortex.neuron.replica import Replica, ServedModel
from cortex.neuron.worker import DeviceWorker

log = logging.getLogger(__name__)
VERSION = "0.1.0"


# The fields of [neuron] a reload applies at once (each request reads them); the others are read
# at start or when a model loads, and wait for a restart.
LIVE = ("admin_token", "admin_token_file", "allowed_paths", "max_tokens_limit", "strict_max_tokens")


class NeuronRuntime:
    """Everything a neuron holds; the HTTP layer (server.py) only calls these methods."""

    def __init__(self, config: NeuronConfig, catalogue: list[ModelSpec] | None = None) -> None:
        self.config = config
        self._base_catalogue = list(DEFAULT_CATALOGUE) if catalogue is None else catalogue
        self.catalogue = merge_catalogues(self._base_catalogue, config.models)
        self.allowed_paths = allowed_roots(config, self.catalogue)
        self.devices: list[Device] = []
        self.workers: dict[str, DeviceWorker] = {}
        self.replicas: dict[str, Replica] = {}
        self._loads: dict[str, asyncio.Task[Replica]] = {}
        self._unloads: dict[str, asyncio.Event] = {}  # set when the model's unload is done
        self._preloading: asyncio.Task[list[Exception]] | None = None
        # Set on SIGTERM: the neuron finishes what runs, and reports itself unfit for more.
        self.shutting_down = False

    async def reload(self, config: NeuronConfig) -> list[str]:
        """Apply a re-read neuron.toml (SIGHUP; docs/security.md, "Rotating a key"): the
        [[models]], the admin token and the fields of LIVE change at once; models already loaded
        stay as they are. Any other field waits for a restart, and the answer says so. A token
        file that cannot be read (ConfigError) changes nothing. One line per change, for the log."""
        old, new = self.config.neuron, config.neuron
        new.admin_secret()  # first: the one step that can fail
        catalogue = merge_catalogues(self._base_catalogue, config.models)
        before = {spec.id: spec for spec in self.catalogue}
        changes = [named_change("models", before, {spec.id: spec for spec in catalogue})]
        now = differing(old, new, LIVE)
        if now:
            changes.append(f"changed {', '.join(f'neuron.{name}' for name in now)}")
        later = [f"neuron.{name}" for name in differing(old, new) if name not in LIVE]
        if later:
            changes.append(f"needs a restart to change: {', '.join(later)}")
        section = old.model_copy(update={name: getattr(new, name) for name in LIVE})
        self.config = NeuronConfig(neuron=section, models=config.models)
        self.catalogue = catalogue
        self.allowed_paths = allowed_roots(self.config, catalogue)
        return changes

    def begin_shutdown(self) -> None:
        """Take no new requests or loads (503 shutting_down); what runs goes on."""
        self.shutting_down = True

    async def start(self) -> None:
        section = self.config.neuron
        if section.lifecycle_open:
            log.warning(
                "NO ADMIN TOKEN: anyone who reaches %s:%d can load and unload models; "
                "set admin_token_file (docs/security.md)",
                section.host,
                section.port,
            )
        self.devices = discover(section.cpu_memory, section.devices or None)
        for device in self.devices:
            self.workers[device.id] = worker = DeviceWorker(device)
            worker.start()
        # Preloads run beside serving: a first download or conversion may outlast a startup
        # probe, and /status shows each model loading, ready or failed meanwhile.
        self._preloading = asyncio.create_task(self._preload(list(section.preload)))

    async def preloaded(self) -> None:
        """Wait for start's preloads; the first that failed raises (`cortex up` serves after)."""
        if self._preloading is not None:
            failures = await asyncio.shield(self._preloading)
            if failures:
                raise failures[0]

    async def _preload(self, models: list[str]) -> list[Exception]:
        """One after another, as listed; a failure is logged and stays in /status, not a crash."""
        failures: list[Exception] = []
        for model in models:
            try:
                await self.load(LoadRequest(model=model))
            except Exception as exc:
                why = exc.message if isinstance(exc, CortexError) else repr(exc)
                log.error("preload of %s failed; serving without it: %s", model, why)
                failures.append(exc)
        return failures

    async def stop(self) -> None:
        if self._preloading is not None:
            self._preloading.cancel()
        for task in self._loads.values():
            task.cancel()
        models = list(self.replicas)
        for model in models:
            try:
                await self.unload(model, force=True)
            except Exception:  # one model must not keep the others, or the workers, up
                log.exception("unloading %s at shutdown failed", model)
        for worker in self.workers.values():
            await asyncio.to_thread(worker.stop)
        log.info("neuron stopped: %d models unloaded", len(models))

    @property
    def healthy(self) -> bool:
        alive = bool(self.devices) and any(d.healthy for d in self.devices)
        return alive and not self.shutting_down

    def status(self) -> NeuronStatus:
        models = [r.record() for r in self.replicas.values()]
        return NeuronStatus(
            node=self.config.neuron.name,
            version=VERSION,
            healthy=self.healthy,
            devices=[d.status() for d in self.devices],
            models=models,
            in_flight=sum(m.in_flight for m in models),
            queued=sum(m.queued for m in models),
            max_running=self.config.neuron.max_running,
            max_queue=self.config.neuron.max_queue,
            lifecycle_open=self.config.neuron.lifecycle_open,
        )

    def listing(self) -> ModelListing:
        loaded = [r.record() for r in self.replicas.values()]
        hf_cache = self.config.neuron.hf_cache
        available = [s for s in self.catalogue if _source_present(s, hf_cache, self.allowed_paths)]
        return ModelListing(loaded=loaded, available=available)

    def check_open(self) -> None:
        """Raise ShuttingDown once the neuron drains for shutdown."""
        if self.shutting_down:
            name = self.config.neuron.name
            raise ShuttingDown(f"neuron {name} is shutting down", retry_after=SHUTDOWN_RETRY_AFTER)

    def served(self, model: str) -> ServedModel:
        self.check_open()
        replica = self._replica(model)
        if replica is None:
            raise ModelNotFound(f"model {model!r} is not loaded on {self.config.neuron.name}")
        if replica.state is ModelState.LOADING:
            raise NeuronUnavailable(f"model {model!r} is still loading", retry_after=2.0)
        if replica.served is None or replica.state is not ModelState.READY:
            raise ModelNotFound(f"model {model!r} is {replica.state.value}")
        return replica.served

    def _replica(self, name: str) -> Replica | None:
        replica = self.replicas.get(name)
        if replica is None:
            spec = resolve_alias(self.catalogue, name)
            replica = self.replicas.get(spec.id) if spec else None
        if replica is not None:
            replica.fail_if_device_lost()
        return replica

    async def load(self, request: LoadRequest) -> LoadedModel:
        """Idempotent and single-flight: concurrent loads of one model share one task. A load that
        names another source than the one the model is loaded (or loading) from is a 409."""
        current = self._replica(request.model)
        unloading = current and self._unloads.get(current.spec.id)
        if unloading:  # its unload would take a new copy with it: load once it is done
            await unloading.wait()
            current = self._replica(request.model)
        if current is not None and current.state is not ModelState.FAILED:
            if request.source and request.source != current.spec.source:
                raise SourceConflict(
                    f"model {current.spec.id!r} is {current.state.value} from "
                    f"{current.spec.source!r}, not from {request.source!r}; unload it first to "
                    "load it from another source"
                )
            spec = current.spec
        else:
            spec = self._spec_for(request)
        existing = self.replicas.get(spec.id)
        if existing and existing.state is ModelState.READY:
            return existing.record()
        task = self._loads.get(spec.id)
        if task is None:
            replica = Replica(spec)
            self.replicas[spec.id] = replica
            task = asyncio.create_task(self._load(replica, request))
            self._loads[spec.id] = task
            task.add_done_callback(lambda done: self._settled(spec.id, done))
        if not request.wait:
            return self.replicas[spec.id].record()
        return (await asyncio.shield(task)).record()

    def _settled(self, model: str, task: asyncio.Task[Replica]) -> None:
        """A load is over. Its failure was logged, and is the error of whoever waits on it; a
        load nobody waits on (`wait: false`, a caller gone) must not end in asyncio's "Task
        exception was never retrieved" traceback besides."""
        self._loads.pop(model, None)
        if not task.cancelled():
            task.exception()

    def _spec_for(self, request: LoadRequest) -> ModelSpec:
        known = resolve_alias(self.catalogue, request.model)
        if request.source:
            base = known.model_dump() if known else {"id": request.model}
            return ModelSpec.model_validate(base | {"source": request.source})
        if known is None:
            problem = (
                "is not in this neuron's catalogue; give a source "
                "(`cortex models load MODEL --source ...`, `--preload MODEL=SOURCE`)"
            )
            raise ModelNotFound(unknown_model(self.catalogue, request.model, problem))
        return known

    async def _load(self, replica: Replica, request: LoadRequest) -> Replica:
        """A failed catalogue model stays listed as failed, with why; a failed ad-hoc load (a
        source no catalogue names) leaves nothing behind: it was never a model of this neuron.
        Nor does a load refused for room: the model did not fail, this neuron was full (a gateway
        would otherwise take the refusal for a failure of the model here, docs/fleet-control.md)."""
        try:
            await self._place_and_load(replica, request)
        except BaseException as exc:
            self._release(replica)
            replica.state, replica.served = ModelState.FAILED, None
            replica.error = exc.message if isinstance(exc, CortexError) else repr(exc)
            log.warning("load of %s failed: %s", replica.spec.id, replica.error)
            refused = isinstance(exc, CapacityExhausted)
            if refused or resolve_alias(self.catalogue, replica.spec.id) is None:
                self._forget(replica)
            raise
        return replica

    async def _place_and_load(self, replica: Replica, request: LoadRequest) -> None:
        spec = replica.spec
        hf_cache = self.config.neuron.hf_cache
        local = await asyncio.to_thread(
            lambda: sources.resolve(
                spec.source,
                hf_cache=hf_cache.expanduser() if hf_cache else None,
                allowed=self.allowed_paths,
            )
        )
        footprint = await asyncio.to_thread(sources.footprint, local)
        replica.progress = 0.05
        devices = self._pick_devices(request.devices, spec.min_devices)
        dtype = loader.pick_dtype(
            request.dtype or spec.dtype or self.config.neuron.dtype, devices[0]
        )
        kv_tokens = self.config.neuron.kv_tokens if spec.kind == "chat" else 0
        replica.memory = (
            spec.memory or footprint.weights(dtype) + footprint.kv_per_token(dtype) * kv_tokens
        )
        per_device = replica.memory // len(devices)
        short = [d for d in devices if d.memory_free() < per_device]
        if short:
            # The estimate travels with the refusal (`error.memory`): a gateway that sent the load
            # on a guess plans again with it (docs/architecture.md, "The placement kernel").
            raise CapacityExhausted(
                f"model {spec.id!r} needs {replica.memory / 2**20:.0f} MiB; {short[0].id} has "
                f"{short[0].memory_free() / 2**20:.0f} MiB free",
                memory=Shortfall(replica.memory, sum(d.memory_free() for d in devices)),
            )
        for device in devices:
            device.committed += per_device
        replica.devices = devices
        worker = self.workers[devices[0].id]
        cache = self.config.neuron.cache_dir

        def progress(value: float) -> None:
            replica.progress = max(replica.progress, value)  # stages never step back

        weights = await worker.run(
            lambda: loader.load_weights(
                local, spec.kind, devices, dtype, cache, progress, share=per_device
            )
        )
        # On a CPU, cpu_linear may keep packed copies of weights: memory the footprint left out.
        extra = cpu_linear.packed_bytes(weights.model)
        replica.memory += extra
        for device in devices:
            device.committed += extra // len(devices)
        served = ServedModel(replica, weights, worker, self.config.neuron)
        if weights.kind == "chat":
            served.engine = await worker.run(lambda: self._start_engine(served, weights, worker))
        replica.served, replica.state = served, ModelState.READY
        replica.progress, replica.loaded_at = 1.0, time.time()

    def _start_engine(
        self, served: ServedModel, weights: loader.LoadedWeights, worker: DeviceWorker
    ) -> Engine:
        """Worker thread: build the model's engine and let the worker drive it."""
        generation = weights.generation_config
        greedy = generation.get("do_sample") is False
        chosen = served.replica.spec.defaults  # the catalogue's, before generation_config
        kv_tokens = self.config.neuron.kv_tokens
        engine = Engine(
            weights.model,
            weights.tokenizer,
            device=worker.device.torch_device,
            max_running=self.config.neuron.max_running,
            defaults=SamplingParams(
                temperature=_first(
                    chosen.temperature, 0.0 if greedy else generation.get("temperature")
                ),
                top_p=_first(chosen.top_p, generation.get("top_p")),
                top_k=_first(chosen.top_k, generation.get("top_k")),
                min_p=_first(chosen.min_p, generation.get("min_p")),
                repetition_penalty=_first(
                    chosen.repetition_penalty, generation.get("repetition_penalty")
                ),
            ),
            eos_token_ids=weights.eos_token_ids,
            context_length=served.context_length,
            prefill_chunk=self.config.neuron.prefill_chunk,
            prefix_cache_tokens=kv_tokens // 4,
            kv_budget_tokens=kv_tokens - kv_tokens // 4,
        )
        worker.attach(engine)
        return engine

    def _pick_devices(self, wanted: list[str] | None, count: int) -> list[Device]:
        healthy = [d for d in self.devices if d.healthy]
        if wanted:
            unknown = [w for w in wanted if w not in {d.id for d in healthy}]
            if unknown:
                raise InvalidRequest(f"unknown or unhealthy devices: {unknown}", param="devices")
            return [d for d in healthy if d.id in wanted]
        if len(healthy) < count:
            raise CapacityExhausted(f"needs {count} devices, {len(healthy)} healthy here")
        return sorted(healthy, key=lambda d: d.memory_free(), reverse=True)[:count]

    async def unload(self, model: str, *, force: bool = False) -> None:
        """One at a time per model: a second unload, or a load, waits for the one under way."""
        replica = self._replica(model)
        if replica is None:
            raise ModelNotFound(f"model {model!r} is not loaded")
        unloading = self._unloads.get(replica.spec.id)
        if unloading is not None:
            await unloading.wait()
            return
        self._unloads[replica.spec.id] = done = asyncio.Event()
        try:
            await self._unload(replica, force)
        finally:
            del self._unloads[replica.spec.id]
            done.set()

    async def _unload(self, replica: Replica, force: bool) -> None:
        task = self._loads.get(replica.spec.id)
        if task is not None:  # a load in progress: stop waiting for it, then clean up
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        served = replica.served
        if served and served.admission.running and not force:
            raise ModelBusy(
                f"model {replica.spec.id!r} has {served.admission.running} requests in flight; "
                "force to unload"
            )
        replica.state = ModelState.UNLOADING
        try:
            if served is not None:
                # Before the job is queued: a request that saw the model open has queued its
                # sequence ahead of the job, so the engine fails it with the rest.
                served.closed = True
                # A poisoned worker runs no job; its engine failed every sequence when poisoned.
                if served.worker.healthy:
                    # Shielded: the weights must go even if whoever asked stops waiting.
                    stopping = served.worker.run(lambda: self._stop_engine(served))
                    await asyncio.shield(stopping)
        finally:  # a replica left UNLOADING could never be unloaded nor loaded again
            self._release(replica)
            self._forget(replica)

    def _forget(self, replica: Replica) -> None:
        """Take the replica out of the table, unless a later load of its model has taken its place."""
        if self.replicas.get(replica.spec.id) is replica:
            del self.replicas[replica.spec.id]

    @staticmethod
    def _stop_engine(served: ServedModel) -> None:
        """Worker thread: fail what is still running, detach, free the weights."""
        if served.engine is not None:
            served.engine.close("model unloaded")
            served.worker.detach(served.engine)
            served.engine = None
        loader.release(served.weights, [served.worker.device])

    def _release(self, replica: Replica) -> None:
        if replica.devices:
            per_device = replica.memory // len(replica.devices)
            for device in replica.devices:
                device.committed = max(0, device.committed - per_device)
        replica.devices = []


def allowed_roots(config: NeuronConfig, catalogue: list[ModelSpec]) -> list[Path]:
    """Where file: sources may load from: `allowed_paths`, or the caches and catalogued paths."""
    section = config.neuron
    if section.allowed_paths is not None:
        return [path.expanduser() for path in section.allowed_paths]
    roots = [section.cache_dir.expanduser()]
    if section.hf_cache is not None:
        roots.append(section.hf_cache.expanduser())
    for spec in catalogue:
        scheme, _, rest = spec.source.partition(":")
        if scheme == "file" and rest:
            roots.append(Path(rest).expanduser())  # the model itself, not its neighbours
    return roots


def _source_present(spec: ModelSpec, hf_cache: Path | None, allowed: list[Path]) -> bool:
    try:
        sources.resolve(spec.source, download=False, hf_cache=hf_cache, allowed=allowed)
    except CortexError:
        return False
    return True


def _first(*values: Any) -> Any:
    """The first value that is set."""
    return next((v for v in values if v is not None), None)
