"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cortex_up import Up, cortex_up


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Converted-weights cache shared by every test that loads a real model (kept between runs)."""
    path = Path(os.environ.get("CORTEX_TEST_CACHE", "~/.cache/cortex")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def shared_up(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """One `cortex up` with the default config, for the files that need nothing else of it: each
    starts from nothing loaded (`unload_all`), as on a process of its own, without paying for a
    process start of its own. It must shut down cleanly at the end."""
    with cortex_up(tmp_path_factory.mktemp("shared-up"), model_cache) as up:
        yield up
        up.process.terminate()
        code = up.process.wait(timeout=30)
        # The SIGTERM the servers took is re-raised once everything has stopped, the in-process
        # neuron (and the models it held) included.
        log = up.log.read_text()
        assert code == -15, f"exit {code}:\n{log[-3000:]}"
        assert "Application shutdown complete" in log and "neuron stopped: " in log, log[-3000:]
