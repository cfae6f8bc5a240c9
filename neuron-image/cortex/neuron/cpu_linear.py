"""Decode-sized linear layers on CPU: the fastest of three kernels, chosen per weight shape.

`F.linear(x, W)` computes `x @ W.T`. With few rows in x (a decode step has one per running
sequence) the BLAS kernel it reaches can run far below the machine's rates, and which kernel does
better depends on the CPU, the weight's shape and the row count (docs/benchmarks.md, P2):
- `weight_left`: `(W @ x.T).T`, a single row padded to two (a one-column product falls back to
  the slow matrix-vector kernel). On the AMD EPYC box it made a whole SmolLM2 decode step 27%
  faster at 1 row, 39% at 4 and 11% at 16; on the Intel Xeon box it only wins for the MLP's down
  projection (576 x 1536) at 16 rows and more.
- `packed`: MKL's packed-weight GEMM (`cblas_sgemm_compute` on a copy of W that MKL laid out for
  small-M products once, at load). On the Xeon box at 16 rows it is 20-50% faster than F.linear
  for every SmolLM2 shape, with bit-identical results there; it costs a second copy of the weight,
  so it is kept only where it beats the other two clearly.
- `left8`: `weight_left` on rows padded with zeros to a multiple of 8 (above 8). On the AMD EPYC
  box the product's cost jumps between multiples of 8 rows: 15 rows took 1.9x as long as 16 in
  the linear layers of a whole step, which made a 15-row decode step slower than a 16-row one.
  Taken where `left` won and padding measures faster (it then replaces `left`).
`install` times the forms per weight shape and row bucket on the model's own weights and routes
each row count to its bucket's winner. The outcome depends only on the shape, the CPU, torch and
its threads, so it is remembered under that key in a file (the neuron's cache_dir): later loads
skip the timing (~2 s, and more on a busy machine).
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
from typing import Literal

import torch
from torch import nn

ROW_BUCKETS = (1, 4, 16, 32)  # row counts timed at load; more rows than the last keep F.linear
_INSTALLED = "_cortex_linear_rows"  # set on a model once its layers were measured
_PACKED = "_cortex_packed_weight"  # a layer's MKL-packed copy of its weight, when it uses one
PACK_ROWS = 16  # the row count MKL is told to lay a packed weight out for (any count runs on it)
LEFT_TILE = 8  # `left8` pads more rows than this to a multiple of it
PAD_PROBE_ROWS = (13, 21)  # row counts between tiles, 3 rows short of one: where padding may pay
TIE = 1.05  # within 5% is timing noise: the whole decode step gained more than single matmuls show

Shape = tuple[int, ...]
Form = Literal["linear", "left", "left8", "packed"]
FORMS: tuple[Form, ...] = ("linear", "left", "left8", "packed")


def install(
    model: nn.Module, memo: Path | None = None, room: int | None = None
) -> dict[Shape, tuple[Form, ...]]:
    """Route the model's CPU linear layers through the fastest kernel for decode-sized inputs.

    Returns, per weight shape, the form each of ROW_BUCKETS takes (a row count takes the choice
    of the first bucket at least as large). A model already set up keeps its first measurement
    (every engine built on it shares its layers). With `memo` (a JSON file), choices made before
    on this machine for these shapes are reused. With `room` (bytes the device can still give),
    packed copies are made only while they fit; a shape whose copies would not takes F.linear.
    """
    if hasattr(model, _INSTALLED):
        return getattr(model, _INSTALLED)
    by_shape: dict[tuple[Shape, torch.dtype], list[nn.Linear]] = {}
    for module in model.modules():
        if _plain_cpu_linear(module):
            shape = (tuple(module.weight.shape), module.weight.dtype)
            by_shape.setdefault(shape, []).append(module)
    remembered = _read_memo(memo)
    chosen: dict[Shape, tuple[Form, ...]] = {}
    for (shape, dtype), layers in by_shape.items():
        key = _key(shape, dtype)
        if key not in remembered:
            remembered[key] = _calibrate([m.weight for m in layers])
        forms = tuple(remembered[key])
        if "packed" in forms:
            copies = sum(m.weight.numel() * m.weight.element_size() for m in layers)
            if room is not None and copies > room:
                forms = tuple("linear" if f == "packed" else f for f in forms)
            elif room is not None:
                room -= copies
        chosen[shape] = forms
        if set(forms) != {"linear"}:
            _reroute(layers, forms)
    if memo is not None and by_shape:
        _write_memo(memo, remembered)
    setattr(model, _INSTALLED, chosen)
    return chosen


def uninstall(model: nn.Module) -> None:
    """Give the model's linear layers back their stock forward (a stock reference to compare with)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            vars(module).pop("forward", None)
            vars(module).pop(_PACKED, None)
    vars(model).pop(_INSTALLED, None)


def packed_bytes(model: nn.Module) -> int:
    """Memory the packed weight copies take (about the size of the weights they copy)."""
    return sum(
        m.weight.numel() * m.weight.element_size()
        for m in model.modules()
        if getattr(m, _PACKED, None) is not None
    )


def weight_left(x: torch.Tensor, weight: torch.Tensor, tile: int = 1) -> torch.Tensor:
    """`x @ weight.T` for a 2-D x of few rows, computed as `(weight @ x.T).T`. With `tile`, more
    rows than a tile are padded with zeros to a multiple of it (their products are dropped)."""
    rows = x.shape[0]
    if rows == 1:  # one column would take the slow matrix-vector kernel
        return torch.mm(weight, torch.cat([x, x]).T).T[:1].contiguous()
    if rows > tile and rows % tile:
        x = torch.cat([x, x.new_zeros(tile - rows % tile, x.shape[1])])
        return torch.mm(weight, x.T).T[:rows].contiguous()
    return torch.mm(weight, x.T).T.contiguous()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """MKL's packed copy of a float32 weight, for `packed_linear`."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), PACK_ROWS)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for a 2-D x, computed on the packed copy (weight gives the shape)."""
    return torch.ops.mkl._mkl_linear(x, packed, weight, None, x.shape[0])


def _can_pack(dtype: torch.dtype) -> bool:
    """MKL's packed GEMM is float32 only, and only in torch builds with MKL."""
    if dtype != torch.float32 or not torch.backends.mkl.is_available():
        return False
    try:
        return callable(torch.ops.mkl._mkl_linear)
    except (AttributeError, RuntimeError):  # a build without the op
        return False


def _reroute(layers: list[nn.Linear], forms: tuple[Form, ...]) -> None:
    by_rows: dict[int, Form] = {}
    low = 1
    for bucket, form in zip(ROW_BUCKETS, forms, strict=True):
        if form != "linear":
            by_rows.update(dict.fromkeys(range(low, bucket + 1), form))
        low = bucket + 1
    forward = _forward(by_rows)
    for layer in layers:
        if "packed" in forms:
            setattr(layer, _PACKED, pack(layer.weight))
        layer.forward = types.MethodType(forward, layer)


def _forward(by_rows: dict[int, Form]) -> Callable[[nn.Linear, torch.Tensor], torch.Tensor]:
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # a lean caller passes 2-D
        form = by_rows.get(flat.shape[0])
        if form is None or torch.is_grad_enabled():
            return nn.functional.linear(x, self.weight, self.bias)
        if form == "left":
            out = weight_left(flat, self.weight)
        elif form == "left8":
            out = weight_left(flat, self.weight, LEFT_TILE)
        else:
            out = packed_linear(flat, getattr(self, _PACKED), self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out if out.dim() == x.dim() else out.reshape(*x.shape[:-1], out.shape[-1])

    return forward


def _key(shape: Shape, dtype: torch.dtype) -> str:
    """What one shape's timing depends on: the shape and dtype, the CPU, torch, its threads."""
    parts = ["forms-left8", repr(shape), str(dtype), _cpu_name(), torch.__version__]
    parts.append(str(torch.get_num_threads()))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _read_memo(memo: Path | None) -> dict[str, list[Form]]:
    try:
        data = json.loads(memo.read_text()) if memo is not None else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    # Only per-shape lists of forms: entries in an older format are timed again.
    return {
        k: v
        for k, v in data.items()
        if isinstance(v, list) and len(v) == len(ROW_BUCKETS) and all(f in FORMS for f in v)
    }


def _write_memo(memo: Path, data: dict[str, list[Form]]) -> None:
    """Atomic, so a neuron loading beside this one never reads half a file; best effort."""
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        staging = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(data, indent=1))
        staging.replace(memo)
    except OSError:
        pass  # a read-only cache: the next load times the kernels again


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
def _calibrate(weights: list[torch.Tensor]) -> list[Form]:
    """Each bucket's form on these weights (one shape). weight_left is kept unless clearly slower
    than F.linear (as before); the packed form, which costs memory, only where clearly faster
    than both, and only if its results match F.linear's."""
    sample = _spread(weights, budget_bytes=32 * 2**20)  # more than a core's cache holds
    packs = [pack(w) for w in sample] if _can_pack(sample[0].dtype) else None
    forms: list[Form] = []
    for rows in ROW_BUCKETS:
        xs = [torch.randn(rows, w.shape[1], dtype=w.dtype) for w in sample]
        runs: list[Callable[[], object]] = [
            lambda xs=xs: [nn.functional.linear(x, w) for x, w in zip(xs, sample, strict=True)],
            lambda xs=xs: [weight_left(x, w) for x, w in zip(xs, sample, strict=True)],
        ]
        if packs is not None and _packed_matches(xs[0], packs[0], sample[0]):
            runs.append(
                lambda xs=xs: [
                    packed_linear(x, p, w) for x, p, w in zip(xs, packs, sample, strict=True)
                ]
            )
        times = _race(*runs)
        best: Form = "left" if times[1] <= times[0] * TIE else "linear"
        if len(times) > 2 and times[2] * TIE < min(times[:2]):
            best = "packed"
        forms.append(best)
    if "left" in forms and _padding_pays(sample):
        forms = ["left8" if form == "left" else form for form in forms]
    return forms


def _padding_pays(sample: list[torch.Tensor]) -> bool:
    """Whether weight_left is clearly faster on rows padded to a multiple of LEFT_TILE, timed at
    row counts between tiles (at a multiple of the tile both forms are the same product)."""
    xs = [[torch.randn(rows, w.shape[1], dtype=w.dtype) for w in sample] for rows in PAD_PROBE_ROWS]

    def run(tile: int) -> None:
        for batch in xs:
            for x, w in zip(batch, sample, strict=True):
                weight_left(x, w, tile)

    plain, padded = _race(lambda: run(1), lambda: run(LEFT_TILE))
    return padded * TIE < plain


def _packed_matches(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor) -> bool:
    """A guard for BLAS builds that behave otherwise: the packed product must be F.linear's."""
    expected = nn.functional.linear(x, weight)
    return torch.allclose(packed_linear(x, packed, weight), expected, rtol=1e-4, atol=1e-4)


def _spread(weights: list[torch.Tensor], budget_bytes: int) -> list[torch.Tensor]:
    """Every k-th weight, so that the sample spreads over the model within the budget."""
    total = sum(w.numel() * w.element_size() for w in weights)
    step = max(1, -(-total // budget_bytes))
    return weights[::step]


def _race(*runs: Callable[[], object], repeats: int = 5) -> list[float]:
    """Median seconds of each run, timed in turns after a warm-up (so drift hits all alike)."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, seen in zip(runs, times, strict=True):
            started = time.perf_counter()
            run()
            seen.append(time.perf_counter() - started)
    return [sorted(seen)[repeats // 2] for seen in times]
