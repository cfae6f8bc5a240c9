"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Converted-weights cache shared by every test that loads a real model (kept between runs)."""
    path = Path(os.environ.get("CORTEX_TEST_CACHE", "~/.cache/cortex")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
