"""Compute devices of this node: discovered through torch, CPU as the fallback."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from cortex.core.config import ConfigError
from cortex.core.fleet import DeviceStatus


def is_device_fault(exc: BaseException) -> bool:
    """A CUDA/driver failure leaves the device in an unknown state; ordinary errors do not."""
    if isinstance(exc, MemoryError):
        return False
    text = f"{type(exc).__name__}: {exc}"
    return "CUDA error" in text or "AcceleratorError" in text or "device-side assert" in text


CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit number; anything this
# large is no limit on any real machine.
_V1_UNLIMITED = 2**60


def _system_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_limit(cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """The container's memory limit (cgroup v2 memory.max or v1 memory.limit_in_bytes); None if none."""
    for path in (cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit() or int(text) >= _V1_UNLIMITED:
            return None
        return int(text)
    return None


def default_cpu_memory(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Half of the memory this process may use: the RAM, or the container's limit if lower.
    The other half is for the neuron process itself (torch, tokenizers, load-time copies)."""
    limit = memory_limit(cgroup_root)
    system = _system_memory()
    return (system if limit is None else min(system, limit)) // 2


@dataclass
class Device:
    """One device and the memory cortex has committed on it (weights + KV budgets)."""

    id: str
    index: int
    kind: Literal["cpu", "cuda"]
    name: str
    memory_total: int
    committed: int = 0
    healthy: bool = True
    error: str | None = None
    _torch: torch.device = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._torch = (
            torch.device("cpu") if self.kind == "cpu" else torch.device("cuda", self.index)
        )

    @property
    def torch_device(self) -> torch.device:
        return self._torch

    def make_current(self) -> None:
        """Make this device the calling thread's current CUDA device (a no-op for the CPU), so
        what a library allocates or launches without naming a device lands here, not on GPU 0."""
        if self.kind == "cuda":
            torch.cuda.set_device(self.index)

    def memory_free(self, own: int = 0) -> int:
        """What a new model may still take: the budget left, and on CUDA what the driver reports.
        `own`, what the asking model has committed here already, is room of its own."""
        budget_left = max(0, self.memory_total - self.committed + own)
        if self.kind == "cuda":
            free, _ = torch.cuda.mem_get_info(self.index)
            return min(budget_left, free)
        return budget_left

    def status(self) -> DeviceStatus:
        free = self.memory_free()
        return DeviceStatus(
            id=self.id,
            index=self.index,
            kind=self.kind,
            name=self.name,
            memory_total=self.memory_total,
            memory_free=free,
            memory_used=self.memory_total - free,
            healthy=self.healthy,
            error=self.error,
        )


def discover(
    cpu_memory: int | None = None,
    only: list[str] | None = None,
    cgroup_root: Path = CGROUP_ROOT,
) -> list[Device]:
    """One Device per CUDA GPU torch sees (cuda-dev-N); cpu-0 when there is none or it is asked for.
    cpu-0 holds `cpu_memory`, by default half the RAM or of the container's memory limit."""
    devices: list[Device] = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(
                Device(f"cuda-dev-{index}", index, "cuda", props.name, props.total_memory)
            )
    if not devices or (only and "cpu-0" in only):
        total = cpu_memory if cpu_memory is not None else default_cpu_memory(cgroup_root)
        devices.append(Device("cpu-0", 0, "cpu", _cpu_name(), total))
    if only:
        unknown = [name for name in only if name not in {d.id for d in devices}]
        if unknown:
            here = ", ".join(d.id for d in devices)
            raise ConfigError(
                f"neuron.devices: {', '.join(map(repr, unknown))} is not a device here "
                f"(this machine has {here}; names are cpu-0 and cuda-dev-N)"
            )
        devices = [d for d in devices if d.id in only]
    return devices


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} threads)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} threads)"
