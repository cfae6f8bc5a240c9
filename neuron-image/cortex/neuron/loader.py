"""Loading weights onto a device (runs on the device's worker thread only).

GGUF files are de-quantized by transformers on every load (slow: the tokenizer and the tensors are
converted); the converted model is saved once as safetensors under the cache dir, so the next load
of the same file (by content: core/cortex/core/weights_cache.py) maps it directly
(mapped_weights.py).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from cortex.core.errors import ModelLoadFailed
from cortex.core.weights_cache import conversion_dir, converting, record_source
from cortex.neuron import cpu_linear
from cortex.neuron.devices import Device
from cortex.neuron.mapped_weights import load_causal_mapped
from cortex.neuron.sources import LocalModel

log = logging.getLogger(__name__)
Progress = Callable[[float], None]
CPU_LINEAR_MEMO = "cpu_linear.json"  # under cache_dir: cpu_linear.py's kernel choices


@dataclass
class LoadedWeights:
    """A model and its tokenizer, resident on `devices`."""

    model: Any
    tokenizer: Any
    kind: Literal["chat", "embedding"]
    context_length: int
    generation_config: dict[str, Any]
    eos_token_ids: set[int]


def pick_dtype(requested: str | None, device: Device) -> str:
    """auto: bfloat16 on CUDA (half the memory, native speed), float32 on CPU (bf16 is slow there)."""
    if requested and requested != "auto":
        if requested not in ("float32", "float16", "bfloat16"):
            raise ModelLoadFailed(
                f"unknown dtype {requested!r}: float32, float16, bfloat16 or auto"
            )
        return requested
    return "bfloat16" if device.kind == "cuda" else "float32"


def load_weights(
    local: LocalModel,
    kind: Literal["chat", "embedding"],
    devices: list[Device],
    dtype: str,
    cache_dir: Path,
    progress: Progress,
    share: int = 0,
) -> LoadedWeights:
    """Load a chat or embedding model onto devices[0] (split over all of them when several).

    `share`: the memory committed for this model on each device before the load.
    `progress` hears 0..1 as the load goes: a first conversion takes it to 0.5, the tensors
    (one step each when mapped) take it on to 0.9; the caller says 1.0 when it serves."""
    try:
        directory, gguf_file = materialize(local, cache_dir, progress)
        progress(0.55)
        if kind == "embedding":
            return _load_embedding(directory, devices[0], dtype, progress)
        return _load_causal(directory, gguf_file, devices, dtype, cache_dir, progress, share)
    except ModelLoadFailed:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if "CUDA" in str(exc):
            raise
        raise ModelLoadFailed(f"cannot load {local.source}: {type(exc).__name__}: {exc}") from exc


def materialize(local: LocalModel, cache_dir: Path, progress: Progress) -> tuple[Path, str | None]:
    """A directory to load from: the model's own, or the converted-GGUF cache (filled on first use)."""
    if local.format == "hf":
        return local.path, None
    cached: Path | None = None
    try:
        cached = conversion_dir(local.path, cache_dir)
        with converting(cached):  # another neuron on this cache may be making it: wait for it
            if not (cached / "config.json").is_file():
                progress(0.1)
                _convert_gguf(local.path, cached, scaled(progress, 0.1, 0.5))
            record_source(cached, local.path)
    except OSError as exc:  # a read-only or full cache must not stop the load itself
        if cached is not None and (cached / "config.json").is_file():
            # made elsewhere, on a cache this neuron cannot write (an image, a read-only volume)
            log.info("reading converted %s from a cache it cannot write (%s)", cached.name, exc)
            return cached, None
        log.warning("cannot cache converted %s: %s", local.path, exc)
        return local.path.parent, local.path.name
    return cached, None


def scaled(progress: Progress, low: float, high: float) -> Progress:
    """A stage's own 0..1 reported as its share, low..high, of the whole load."""
    return lambda value: progress(low + (high - low) * min(max(value, 0.0), 1.0))


def _convert_gguf(gguf: Path, target: Path, progress: Progress) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _CONVERTING, _gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        progress(0.2)  # transformers de-quantizes in one call: the steps are its stages
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        progress(0.7)
    # The tensors are plain de-quantized floats now; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # atomic: a crash mid-save never leaves a half cache behind


_CONVERTING = threading.Lock()  # one conversion at a time: _gguf_read_once patches a module


@contextmanager
def _gguf_read_once() -> Iterator[None]:
    """Work transformers repeats while converting a GGUF, done once (docs/benchmarks.md, P3):
    it opens the file with `GGUFReader` three times (config, tokenizer, weights; ~3 s of CPU each
    on SmolLM2, which indexes the whole vocabulary), and builds gguf's tensor-name table, the same
    for one architecture and depth, once per module of the model (397 times for SmolLM2)."""
    import gguf
    import numpy as np

    real_reader, real_names = gguf.GGUFReader, gguf.get_tensor_name_map
    opened: dict[tuple[str, str], Any] = {}

    class ArrayReader(real_reader):  # type: ignore[misc,valid-type]
        """gguf's reader over a plain array of the mapped file: indexing an `np.memmap` runs
        Python on every slice, and reading the header slices millions of times."""

        @property
        def data(self) -> Any:
            return self._array

        @data.setter
        def data(self, mapped: Any) -> None:
            self._array = mapped.view(np.ndarray)  # still the mapped pages: the view keeps them

    def reader(path: str | os.PathLike[str], mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in opened:
            opened[key] = ArrayReader(path, mode)
        return opened[key]

    gguf.GGUFReader = reader  # type: ignore[assignment,misc]
    gguf.get_tensor_name_map = functools.cache(real_names)  # read-only tables: safe to share
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_names  # type: ignore[misc]


def _load_causal(
    directory: Path,
    gguf_file: str | None,
    devices: list[Device],
    dtype: str,
    cache_dir: Path,
    progress: Progress,
    share: int,
) -> LoadedWeights:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    progress(0.6)
    model = None
    if gguf_file is None and len(devices) == 1:
        model = load_causal_mapped(
            directory, getattr(torch, dtype), devices[0].torch_device, scaled(progress, 0.6, 0.85)
        )
    if model is None:
        model = _from_pretrained(directory, gguf_file, devices, dtype, share)
    progress(0.85)
    if len(devices) == 1:
        model.to(devices[0].torch_device)
    model.eval()
    if devices[0].kind == "cpu":  # the engine's kernel choice, remembered per machine (P3)
        memo = cache_dir.expanduser() / CPU_LINEAR_MEMO
        # The model's footprint is committed already: what is free is the room for packed copies.
        cpu_linear.install(model, memo=memo, room=devices[0].memory_free())
    progress(0.9)
    # only what the model sets itself: to_dict() would add library defaults (do_sample=False, ...)
    generation = model.generation_config.to_diff_dict() if model.generation_config else {}
    eos = generation.get("eos_token_id", tokenizer.eos_token_id)
    eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
    if tokenizer.eos_token_id is not None:
        eos_ids.add(int(tokenizer.eos_token_id))
    return LoadedWeights(
        model=model,
        tokenizer=tokenizer,
        kind="chat",
        context_length=int(getattr(model.config, "max_position_embeddings", 2048)),
        generation_config=generation,
        eos_token_ids=eos_ids,
    )


def _from_pretrained(
    directory: Path, gguf_file: str | None, devices: list[Device], dtype: str, share: int
) -> Any:
    """transformers' own loading: GGUF, renamed or quantized checkpoints, several devices."""
    from transformers import AutoModelForCausalLM

    # sdpa honours the engine's 4D masks (rows of different lengths); flash-attention would not.
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, dtype),
        "gguf_file": gguf_file,
        "attn_implementation": "sdpa",
    }
    if len(devices) > 1:  # split layers over the GPUs of this node
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = split_memory(devices, share)
    return AutoModelForCausalLM.from_pretrained(directory, **kwargs)


def split_memory(devices: list[Device], share: int) -> dict[int, int]:
    """accelerate's max_memory for a model split over devices: what each has free, the `share`
    this model committed there before loading included (without it a split model was capped
    below its own footprint and offloaded or failed)."""
    return {d.index: d.memory_free(own=share) for d in devices}


def _load_embedding(
    directory: Path, device: Device, dtype: str, progress: Progress
) -> LoadedWeights:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    progress(0.6)
    model = AutoModel.from_pretrained(directory, dtype=getattr(torch, dtype))
    progress(0.8)
    model.to(device.torch_device).eval()
    progress(0.9)
    context = min(
        int(getattr(model.config, "max_position_embeddings", 512)),
        int(getattr(tokenizer, "model_max_length", 512) or 512),
    )
    return LoadedWeights(model, tokenizer, "embedding", context, {}, set())


@torch.inference_mode()
def embed(
    weights: LoadedWeights, texts: list[str], device: Device
) -> tuple[list[list[float]], int]:
    """Mean-pooled, L2-normalized sentence embeddings (the sentence-transformers recipe for MiniLM)."""
    batch = weights.tokenizer(
        texts, padding=True, truncation=True, max_length=weights.context_length, return_tensors="pt"
    ).to(device.torch_device)
    hidden = weights.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    vectors = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
    return vectors.cpu().tolist(), int(batch["attention_mask"].sum().item())


def release(weights: LoadedWeights, devices: list[Device]) -> None:
    """Drop the model's tensors and give the memory back to the allocator."""
    weights.model = None
    import gc

    gc.collect()
    if any(d.kind == "cuda" for d in devices):
        torch.cuda.empty_cache()
