"""What a benchmark ran on besides report.environment(): CPU model, threads, package versions."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown cpu"


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of `packages` in this interpreter ('absent' for those not installed)."""
    found = {}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "absent"
    return found


def commit() -> str:
    """The checkout's commit, marked `+dirty` when tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def describe(threads: int | None = None, **extra: Any) -> dict[str, Any]:
    """Printed at the start of a run and stored in its JSON."""
    info: dict[str, Any] = {"cpu": cpu_name(), "cpus": os.cpu_count(), "commit": commit()}
    if threads is not None:
        info["torch_threads"] = threads
    info.update(extra)
    print("ran on: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    return info
