"""A causal LM built on the meta device, its weights memory-mapped from the directory's safetensors.

`from_pretrained` spends most of a cached load on bookkeeping, not on reading: it compiles the
checkpoint-renaming patterns of every architecture it knows (~1,200 regexes) and walks each tensor
through them (docs/benchmarks.md, P3). A directory whose tensor names already match the model (the
converted-GGUF cache, saved by `save_pretrained`) needs none of that: the modules are created
without storage, and each parameter is assigned a tensor that views the mapped file, so nothing is
copied until a page is first touched (and, from the page cache, not read from disk either).
Anything else (renamed keys, quantized or .bin checkpoints) returns None: from_pretrained then.
"""

from __future__ import annotations

import json
import logging
import mmap
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 2**20


def load_causal_mapped(
    directory: Path,
    dtype: torch.dtype,
    device: torch.device,
    progress: Callable[[float], None] = lambda _: None,
) -> Any | None:
    """The model in eval mode on `device` with every weight from the directory, or None to fall
    back. On the CPU the weights stay mapped; elsewhere each is copied over, then cast there.
    `progress` hears each tensor's share of the bytes as it is placed (0..1)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]

    files = sorted(directory.glob("*.safetensors"))
    config = AutoConfig.from_pretrained(directory)
    if not files or getattr(config, "quantization_config", None):
        return None
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(map_safetensors(file))
    # Parameters without storage and no random init (every one is assigned below); buffers (the
    # rotary frequencies) are computed as usual.
    with init_empty_weights(include_buffers=False), no_init_weights():
        # sdpa honours the engine's 4D masks (rows of different lengths); flash-attention would not.
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if getattr(model, "_keep_in_fp32_modules", None) or getattr(
        model, "_keep_in_fp32_modules_strict", None
    ):
        return (
            None  # some weights must stay float32 whatever the dtype: from_pretrained knows which
        )
    state = _placed(tensors, dtype, device, progress)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # a tied head is not in the file: it shares the embedding's tensor
    if unexpected or any(p.is_meta for p in model.parameters()):
        log.info(
            "%s: tensor names differ from the model's (%d unexpected, missing %s): from_pretrained",
            directory,
            len(unexpected),
            missing[:3],
        )
        return None
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


def _placed(
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    progress: Callable[[float], None],
) -> dict[str, torch.Tensor]:
    """Each tensor on the device in the dtype (no-ops when equal), the bytes done told as it goes."""
    total = sum(t.nbytes for t in tensors.values()) or 1
    done, state = 0, {}
    for name, tensor in tensors.items():
        state[name] = tensor.to(device).to(dtype)
        done += tensor.nbytes
        progress(done / total)
    return state


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, as views of a private (copy-on-write) mapping."""
    with path.open("rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        if size > _MAX_HEADER:
            raise ValueError(f"{path}: corrupt safetensors header")
        header = json.loads(file.read(size))
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    start = 8 + size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = (end - begin) // dtype.itemsize
        if count == 0:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + begin)
        tensors[name] = flat.view(info["shape"])
    return tensors
