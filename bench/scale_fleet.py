"""The two servers the operator scale benchmark runs beside the operator, each in its own process:

- `cluster`: kmock's Kubernetes emulator with the project's CRDs, validating every write against
  their schemas (the tests' `CortexCluster`, tests/fakes/cluster.py), over HTTP;
- `neurons`: many light fake neurons behind one port, neuron i under /n/i/. Each speaks the
  lifecycle API the operator uses (GET /status, POST /models/load, POST /models/unload) with the
  real wire models; a load takes `--load-delay` seconds, as a small real one would.

`python -m bench.scale_fleet cluster --port P` / `neurons --port P --count N --memory-gib G`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cortex.core.errors import CapacityExhausted, CortexError, ModelNotFound
from cortex.core.fleet import (
    DeviceStatus,
    LoadedModel,
    LoadRequest,
    ModelState,
    NeuronStatus,
    UnloadRequest,
)
from cortex.core.protocol.errors import error_headers, openai_error

GIB = 2**30
TESTS = Path(__file__).resolve().parent.parent / "tests"


@dataclass
class Replica:
    model: str
    memory: int
    source: str | None  # what the load asked for, reported back in /status as a neuron does
    state: ModelState = ModelState.LOADING
    loaded_at: float | None = None


@dataclass
class FleetNeuron:
    """One fake neuron: its memory and what it holds."""

    name: str
    memory: int
    models: dict[str, Replica] = field(default_factory=dict)
    loads: int = 0

    def free(self) -> int:
        return self.memory - sum(r.memory for r in self.models.values())

    def status(self) -> NeuronStatus:
        device = DeviceStatus(
            id="cpu-0",
            index=0,
            kind="cpu",
            name="fake cpu",
            memory_total=self.memory,
            memory_free=self.free(),
            memory_used=self.memory - self.free(),
        )
        return NeuronStatus(
            node=self.name,
            version="fake",
            healthy=True,
            devices=[device],
            models=[self.view(r) for r in self.models.values()],
            in_flight=0,
        )

    @staticmethod
    def view(replica: Replica) -> LoadedModel:
        return LoadedModel(
            id=replica.model,
            source=replica.source or f"file:/fake/{replica.model}",
            state=replica.state,
            devices=["cpu-0"],
            memory_bytes=replica.memory,
            loaded_at=replica.loaded_at,
            progress=1.0 if replica.state == ModelState.READY else 0.5,
        )


def neurons_app(count: int, memory: int, load_delay: float) -> FastAPI:
    """`count` fake neurons, neuron i answering under /n/i/."""
    fleet = [FleetNeuron(f"fake-{i:04d}", memory) for i in range(count)]
    app = FastAPI()

    @app.exception_handler(CortexError)
    async def _error(_: Request, err: CortexError) -> JSONResponse:
        return JSONResponse(openai_error(err), err.status, headers=error_headers(err))

    def neuron(index: int) -> FleetNeuron:
        if not 0 <= index < len(fleet):
            raise ModelNotFound(f"no neuron {index}")
        return fleet[index]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "neurons": count, "loads": sum(n.loads for n in fleet)}

    @app.get("/n/{index}/status")
    async def status(index: int) -> dict[str, Any]:
        return neuron(index).status().model_dump()

    @app.post("/n/{index}/models/load")
    async def load(index: int, request: Request) -> dict[str, Any]:
        target = neuron(index)
        wanted = LoadRequest.model_validate(await request.json())
        existing = target.models.get(wanted.model)
        if existing is not None:
            while existing.state == ModelState.LOADING:  # a second ask waits for the first
                await asyncio.sleep(0.05)
            return target.view(existing).model_dump()
        size = _size(wanted.source)
        if size > target.free():
            raise CapacityExhausted(f"{wanted.model} needs {size}, {target.free()} free")
        target.loads += 1
        replica = target.models[wanted.model] = Replica(wanted.model, size, wanted.source)
        await asyncio.sleep(load_delay)
        replica.state, replica.loaded_at = ModelState.READY, time.time()
        return target.view(replica).model_dump()

    @app.post("/n/{index}/models/unload")
    async def unload(index: int, request: Request) -> dict[str, Any]:
        target = neuron(index)
        wanted = UnloadRequest.model_validate(await request.json())
        if target.models.pop(wanted.model, None) is None:
            raise ModelNotFound(f"{wanted.model!r} is not loaded")
        return {"model": wanted.model, "unloaded": True}

    return app


def _size(source: str | None) -> int:
    """The benchmark's sources say their size: file:/models/<name>?gib=<n>."""
    if source and "?gib=" in source:
        return int(float(source.rsplit("?gib=", 1)[1]) * GIB)
    return GIB


async def serve_cluster(port: int) -> None:
    """The emulator with the CRDs, on 127.0.0.1:`port`, until killed."""
    sys.path.insert(0, str(TESTS))  # tests/fakes is the one home of the CRD-validating emulator
    import kmock
    from fakes.cluster import CortexCluster
    from kmock._internal import rendering

    class LeanCluster(CortexCluster):
        """kmock keeps every request for a test's assertions, and matches each new one by scanning
        them all: the emulator slows down as the square of the requests served. A benchmark asks
        nothing of the history, so only the request at hand is kept."""

        async def _handle(self, request: rendering.Request) -> Any:
            self._requests[:] = [request]  # before the first await: matching sees this one
            return await super()._handle(request)

    async with LeanCluster() as cluster, kmock.Server(cluster, port=port):
        cluster.register(namespaces=("default",))
        await asyncio.Event().wait()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_fleet", description=__doc__)
    parser.add_argument("server", choices=("cluster", "neurons"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=100, help="neurons served")
    parser.add_argument("--memory-gib", type=float, default=24.0, help="memory of each neuron")
    parser.add_argument("--load-delay", type=float, default=0.5, help="seconds a load takes")
    args = parser.parse_args(argv)
    if args.server == "cluster":
        asyncio.run(serve_cluster(args.port))
        return 0
    app = neurons_app(args.count, int(args.memory_gib * GIB), args.load_delay)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
