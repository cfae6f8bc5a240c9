"""What a benchmark ran on besides report.environment(): CPU model, threads, package versions."""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any


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


def describe(threads: int | None = None, **extra: Any) -> dict[str, Any]:
    """Printed at the start of a run and stored in its JSON."""
    info: dict[str, Any] = {"cpu": cpu_name(), "cpus": os.cpu_count()}
    if threads is not None:
        info["torch_threads"] = threads
    info.update(extra)
    print("ran on: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    return info
