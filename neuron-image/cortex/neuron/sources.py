"""Model sources (pkg:, file:, hf:) resolved to local files, and memory estimates made before loading.

A source never reaches outside where it is allowed to: pkg: stays inside its package directory, file:
inside the neuron's allowed roots (docs/security.md). A path outside them, a missing one and an
unreadable one all get the same answer, so a load request cannot probe the disk.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cortex.core.errors import InvalidRequest, ModelLoadFailed, ModelNotFound
from cortex.neuron.gguf_header import read_header

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class LocalModel:
    """Where a model's files are: a GGUF file, or a directory in Hugging Face layout."""

    source: str
    format: Literal["gguf", "hf"]
    path: Path  # the .gguf file, or the model directory

    @property
    def directory(self) -> Path:
        return self.path.parent if self.format == "gguf" else self.path


def resolve(
    source: str,
    *,
    download: bool = True,
    hf_cache: Path | None = None,
    allowed: Sequence[Path] | None = None,
) -> LocalModel:
    """Find a source's files on this machine; hf: downloads only if `download` and the network allows.

    file: paths must lie under one of `allowed` (None: anywhere, for callers that are not a server).
    """
    scheme, sep, rest = source.partition(":")
    if not sep or not rest:
        raise InvalidRequest(f"source {source!r}: expected pkg:, file: or hf:", param="source")
    if scheme == "pkg":
        package, _, inner = rest.partition("/")
        spec = importlib.util.find_spec(package)  # finds without importing the package's code
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(f"source {source!r}: python package {package!r} is not installed")
        root = Path(spec.submodule_search_locations[0]).resolve()
        return _local(source, _confined(source, root / inner, [root]))
    if scheme == "file":
        path = Path(rest).expanduser()
        return _local(source, _confined(source, path, allowed) if allowed is not None else path)
    if scheme == "hf":
        return _local(source, _hf_snapshot(source, rest, download, hf_cache))
    raise InvalidRequest(f"source {source!r}: unknown scheme {scheme!r}", param="source")


def unavailable(source: str) -> ModelNotFound:
    """The one answer for a path outside the allowed roots, missing, or unreadable."""
    return ModelNotFound(
        f"source {source!r}: no model there, or the path is outside this neuron's allowed_paths"
    )


def _confined(source: str, path: Path, roots: Sequence[Path]) -> Path:
    """`path` with links and `..` resolved, if it lies under one of `roots`."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a link loop, a component we may not read
        raise unavailable(source) from None
    for root in roots:
        try:
            inside = real.is_relative_to(root.expanduser().resolve())
        except (OSError, RuntimeError):
            continue
        if inside:
            return real
    raise unavailable(source)


def _local(source: str, path: Path) -> LocalModel:
    if not os.access(path, os.R_OK):  # missing or unreadable: the same answer as outside the roots
        raise unavailable(source)
    if path.is_file() and path.suffix == ".gguf":
        return LocalModel(source, "gguf", path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadFailed(f"source {source!r}: {path} has no config.json")
        return LocalModel(source, "hf", path)
    raise ModelLoadFailed(f"source {source!r}: {path} is neither a .gguf file nor a model dir")


def _hf_snapshot(source: str, repo: str, download: bool, cache: Path | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    where = {"revision": revision or None, "cache_dir": cache}
    try:  # offline first: the local cache answers without touching the network
        return Path(snapshot_download(repo_id, local_files_only=True, **where))
    except LocalEntryNotFoundError:
        if not download or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise ModelNotFound(f"source {source!r}: not in the local HF cache (offline)") from None
    try:
        return Path(snapshot_download(repo_id, **where))
    except Exception as exc:
        raise ModelNotFound(f"source {source!r}: not cached and download failed: {exc}") from None


@dataclass(frozen=True)
class Footprint:
    """Parameter count and KV bytes per token, read from file headers (nothing loaded)."""

    parameters: int
    kv_bytes_per_token_fp32: int

    def weights(self, dtype: str) -> int:
        return self.parameters * DTYPE_BYTES.get(dtype, 4)

    def kv_per_token(self, dtype: str) -> int:
        return self.kv_bytes_per_token_fp32 * DTYPE_BYTES.get(dtype, 4) // 4


def footprint(local: LocalModel) -> Footprint:
    """Read parameter count and KV geometry; raises ModelLoadFailed on a corrupt file."""
    try:
        if local.format == "gguf":
            return _gguf_footprint(local.path)
        return _hf_footprint(local.path)
    except ModelLoadFailed:
        raise
    except Exception as exc:
        raise ModelLoadFailed(f"source {local.source!r}: cannot read {local.path}: {exc}") from None


def _kv_bytes(layers: int, kv_heads: int, head_dim: int) -> int:
    return 2 * layers * kv_heads * head_dim * 4


def _gguf_footprint(path: Path) -> Footprint:
    header = read_header(path)
    arch = str(header.fields.get("general.architecture", ""))
    layers = header.int_field(f"{arch}.block_count")
    heads = header.int_field(f"{arch}.attention.head_count", 1) or 1
    kv_heads = header.int_field(f"{arch}.attention.head_count_kv", heads)
    width = header.int_field(f"{arch}.embedding_length")
    return Footprint(sum(header.tensor_elements), _kv_bytes(layers, kv_heads, width // heads))


def _hf_footprint(directory: Path) -> Footprint:
    config = json.loads((directory / "config.json").read_text())
    parameters = 0
    files = sorted(directory.glob("*.safetensors"))
    if not files and not any(directory.glob("*.bin")):
        raise ModelLoadFailed(f"{directory}: no weights (*.safetensors or *.bin)")
    for file in files:
        parameters += _safetensors_parameters(file)
    if not files:  # .bin only: the file size is the best cheap estimate (fp32)
        parameters = sum(f.stat().st_size for f in directory.glob("*.bin")) // 4
    layers = int(config.get("num_hidden_layers", 0))
    heads = int(config.get("num_attention_heads", 1))
    kv_heads = int(config.get("num_key_value_heads", heads))
    head_dim = int(config.get("head_dim") or config.get("hidden_size", 0) // max(heads, 1))
    kv = _kv_bytes(layers, kv_heads, head_dim) if config.get("is_decoder", True) else 0
    return Footprint(parameters, kv)


def _safetensors_parameters(file: Path) -> int:
    with file.open("rb") as handle:
        header_size = struct.unpack("<Q", handle.read(8))[0]
        if header_size > 100 * 2**20:
            raise ModelLoadFailed(f"{file}: corrupt safetensors header")
        header = json.loads(handle.read(header_size))
    total = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in tensor["shape"]:
            count *= dim
        total += count
    return total
