"""What a benchmark ran on besides report.environment(): CPU model, threads, package versions."""

from __future__ import annotations

import importlib.metadata
import os
import resource
import subprocess
import time
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


def _busy_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine spent busy, and stolen by the hypervisor, since boot."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _own_seconds() -> float:
    """CPU seconds of this process and of its children already waited for (stopped servers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class CpuWatch:
    """How much of the machine other work took during a phase: on a shared box, a phase whose
    neighbours were busy gives lower numbers, and a ratio across phases is skewed by it."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.busy, self.steal = _busy_seconds()
        self.own = _own_seconds()

    def shares(self) -> dict[str, float]:
        """Fractions of all CPUs over the phase; call after its servers were stopped and waited."""
        capacity = (time.monotonic() - self.started) * (os.cpu_count() or 1)
        busy, steal = _busy_seconds()
        own = _own_seconds() - self.own
        return {
            "ours": round(own / capacity, 3),
            "others": round(max(0.0, busy - self.busy - own) / capacity, 3),
            "stolen": round((steal - self.steal) / capacity, 3),
        }


def cpu_note(phases: dict[str, dict[str, float]]) -> str:
    """One line for a report's notes: who used the CPUs during each phase."""
    parts = [
        f"{name}: ours {s['ours']:.0%}, other processes {s['others']:.0%}, stolen {s['stolen']:.0%}"
        for name, s in phases.items()
    ]
    return "share of all CPUs during the run (" + "; ".join(parts) + ")"
