"""The converted-weights cache (GGUF -> safetensors) under a neuron's cache_dir, keyed by the
GGUF file's content: the same model installed in two venvs is converted and stored once. A file
is hashed once; the hash is remembered by (path, size, mtime) in `hashes.json`. Neurons may share
one cache (pods on one node, a rolling update beside the pods it replaces): a conversion is made
by one of them while the others wait (`converting`)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_CHUNK = 4 * 2**20
SOURCES = "sources.json"  # in each conversion: the GGUF paths it was made for


def converted_root(cache_dir: Path) -> Path:
    return cache_dir.expanduser() / "converted"


def content_hash(gguf: Path, cache_dir: Path) -> str:
    """sha256 of the file, from the remembered hashes while its path, size and mtime match."""
    stat = gguf.stat()
    stamp = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    index_path = converted_root(cache_dir) / "hashes.json"
    index = _read_json(index_path)
    if stamp in index:
        return str(index[stamp])
    digest = hashlib.sha256()
    with gguf.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    index[stamp] = digest.hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache: hashed again next time, still right
        _write_json(index_path, index)
    return index[stamp]


def conversion_dir(gguf: Path, cache_dir: Path) -> Path:
    """Where the conversion of this file's content lives (made or not)."""
    return converted_root(cache_dir) / f"{gguf.stem}-{content_hash(gguf, cache_dir)[:16]}"


@contextmanager
def converting(conversion: Path) -> Iterator[None]:
    """Held while this conversion is made or its sources are noted: whoever comes second waits,
    then finds it made. The lock is the kernel's (flock on a file beside it), so it goes with a
    holder that crashes, and it holds between threads too (each opens its own description)."""
    conversion.parent.mkdir(parents=True, exist_ok=True)
    with open(conversion.with_name(f"{conversion.name}.lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as exc:  # a filesystem without locks (NFS mounted nolock): unguarded
            log.warning("cannot lock %s (%s): converting without it", conversion.name, exc)
        yield


def record_source(conversion: Path, gguf: Path) -> None:
    """Note that `gguf` uses this conversion (shown by list, read by prune)."""
    sources = set(_read_json(conversion / SOURCES).get("sources", []))
    sources.add(str(gguf.resolve()))
    _write_json(conversion / SOURCES, {"sources": sorted(sources)})


@dataclass(frozen=True)
class Conversion:
    path: Path
    size: int
    sources: list[str]

    @property
    def orphaned(self) -> bool:
        """No GGUF file it was made from is still there."""
        return not any(Path(source).is_file() for source in self.sources)


def conversions(cache_dir: Path) -> list[Conversion]:
    root = converted_root(cache_dir)
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.is_dir():
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            sources = list(_read_json(path / SOURCES).get("sources", []))
            found.append(Conversion(path, size, sources))
    return found


def prune(cache_dir: Path, everything: bool = False) -> list[Conversion]:
    """Remove orphaned conversions (all with `everything`); returns what was removed."""
    removed = [c for c in conversions(cache_dir) if everything or c.orphaned]
    for conversion in removed:
        shutil.rmtree(conversion.path, ignore_errors=True)
    if everything:
        (converted_root(cache_dir) / "hashes.json").unlink(missing_ok=True)
    return removed


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, object]) -> None:
    """Atomic, so concurrent neurons never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(data, indent=1))
    staging.replace(path)
