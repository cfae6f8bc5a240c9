"""Decode-sized linear layers on CPU: the weight as the left operand of the matmul.

`F.linear(x, W)` computes `x @ W.T`. With few rows in x (a decode step has one per running
sequence) the BLAS kernel it reaches can stream W far below memory bandwidth: on the 2-vCPU box
this project is measured on, ~10 GB/s against 30+ GB/s for `W @ x.T`, which made a whole SmolLM2
decode step 27% faster at 1 row, 39% at 4 and 11% at 16 (docs/benchmarks.md, P2). A single row
is padded to two, since a one-column product falls back to the slow matrix-vector kernel. Which
kernel wins depends on the CPU's BLAS, so `install` times both on the model's own weights and
keeps the weight-left form only for the row counts where it was faster. The outcome depends only on
the weights' shapes, the CPU, torch and its threads, so it is remembered under that key in a file
(the neuron's cache_dir): later loads skip the timing (~0.3 s, and more on a busy machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROW_BUCKETS = (1, 4, 16, 32)  # row counts timed at load; more rows than the last keep F.linear
_INSTALLED = "_cortex_linear_rows"  # set on a model once its layers were measured
TIE = 1.05  # within 5% is timing noise: the whole decode step gained more than single matmuls show


def install(model: nn.Module, memo: Path | None = None) -> int | None:
    """Route the model's CPU linear layers through the faster kernel for decode-sized inputs.

    Returns the largest row count that takes the weight-left form (None: F.linear won). A model
    already set up keeps its first measurement (every engine built on it shares its layers).
    With `memo` (a JSON file), a choice made before on this machine for these shapes is reused.
    """
    if hasattr(model, _INSTALLED):
        return getattr(model, _INSTALLED)
    layers = [m for m in model.modules() if _plain_cpu_linear(m)]
    weights = [m.weight for m in layers]
    key = _key(weights)
    remembered = _read_memo(memo)
    if key in remembered:
        limit = remembered[key]
    else:
        limit = _calibrate(weights) if layers else None
        if memo is not None and layers:
            _write_memo(memo, {**remembered, key: limit})
    if limit is not None:
        for layer in layers:
            layer.forward = types.MethodType(_forward(limit), layer)
    setattr(model, _INSTALLED, limit)
    return limit


def _key(weights: list[torch.Tensor]) -> str:
    """What the timing depends on: the weights' shapes and dtypes, the CPU, torch, its threads."""
    shapes = sorted({(tuple(w.shape), str(w.dtype)) for w in weights})
    parts = [repr(shapes), _cpu_name(), torch.__version__, str(torch.get_num_threads())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _read_memo(memo: Path | None) -> dict[str, int | None]:
    try:
        data = json.loads(memo.read_text()) if memo is not None else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if v is None or isinstance(v, int)}


def _write_memo(memo: Path, data: dict[str, int | None]) -> None:
    """Atomic, so a neuron loading beside this one never reads half a file; best effort."""
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        staging = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(data, indent=1))
        staging.replace(memo)
    except OSError:
        pass  # a read-only cache: the next load times the kernels again


def weight_left(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for a 2-D x of few rows, computed as `(weight @ x.T).T`."""
    rows = x.shape[0]
    if rows == 1:  # one column would take the slow matrix-vector kernel
        x = torch.cat([x, x])
    return torch.mm(weight, x.T).T[:rows].contiguous()


def _forward(limit: int) -> Callable[[nn.Linear, torch.Tensor], torch.Tensor]:
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] > limit or torch.is_grad_enabled():
            return nn.functional.linear(x, self.weight, self.bias)
        out = weight_left(flat, self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return forward


def _plain_cpu_linear(module: nn.Module) -> bool:
    """A stock nn.Linear (not a quantized subclass) with floating weights on the CPU, whose
    forward no accelerate hook wraps (offloading moves its weights in that hook)."""
    return (
        type(module) is nn.Linear
        and module.weight.device.type == "cpu"
        and module.weight.dtype.is_floating_point
        and not hasattr(module, "_hf_hook")
    )


@torch.inference_mode()
def _calibrate(weights: list[torch.Tensor]) -> int | None:
    """The largest bucket up to which the weight-left form was never clearly slower."""
    sample = _spread(weights, budget_bytes=64 * 2**20)  # more than a CPU cache holds
    limit = None
    for rows in ROW_BUCKETS:
        pairs = [(torch.randn(rows, w.shape[1], dtype=w.dtype), w) for w in sample]
        plain, left = _race(
            lambda pairs=pairs: [nn.functional.linear(x, w) for x, w in pairs],
            lambda pairs=pairs: [weight_left(x, w) for x, w in pairs],
        )
        if left > plain * TIE:
            break
        limit = rows
    return limit


def _spread(weights: list[torch.Tensor], budget_bytes: int) -> list[torch.Tensor]:
    """Every k-th weight so that the sample covers the model's shapes within the budget."""
    total = sum(w.numel() * w.element_size() for w in weights)
    step = max(1, -(-total // budget_bytes))
    return weights[::step]


def _race(a: Callable[[], object], b: Callable[[], object], runs: int = 5) -> tuple[float, float]:
    """Median seconds of a and b, timed in turns after a warm-up (so drift hits both alike)."""
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for run, seen in zip((a, b), times, strict=True):
            started = time.perf_counter()
            run()
            seen.append(time.perf_counter() - started)
    return sorted(times[0])[runs // 2], sorted(times[1])[runs // 2]
