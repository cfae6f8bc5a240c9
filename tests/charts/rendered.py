"""Running helm and reading what it renders."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cortex"

Render = Callable[..., list[dict[str, Any]]]


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """helm, its output captured; the caller judges the exit status."""
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of this kind (and name, when given)."""
    matches = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"{len(matches)} {kind} {name or ''} in the rendered chart"
    return matches[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    """A workload's container by name."""
    (found,) = (c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)
    return found


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    """The labels a workload's pods carry."""
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a matchLabels selector selects these labels."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())
