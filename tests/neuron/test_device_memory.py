"""cpu-0's default budget: half of what the process may use, the container's limit included."""

from __future__ import annotations

from pathlib import Path

from cortex.neuron import devices
from cortex.neuron.devices import default_cpu_memory, discover, memory_limit

GIB = 2**30


def _host(monkeypatch, size: int) -> None:
    monkeypatch.setattr(devices, "_system_memory", lambda: size)


def test_cgroup_v2_limit_caps_the_budget(tmp_path: Path, monkeypatch) -> None:
    _host(monkeypatch, 64 * GIB)
    (tmp_path / "memory.max").write_text(f"{6 * GIB}\n")
    assert memory_limit(tmp_path) == 6 * GIB
    assert default_cpu_memory(tmp_path) == 3 * GIB
    (cpu,) = discover(only=["cpu-0"], cgroup_root=tmp_path)
    assert cpu.memory_total == 3 * GIB


def test_cgroup_v1_limit_caps_the_budget(tmp_path: Path, monkeypatch) -> None:
    _host(monkeypatch, 64 * GIB)
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{4 * GIB}\n")
    (cpu,) = discover(only=["cpu-0"], cgroup_root=tmp_path)
    assert cpu.memory_total == 2 * GIB


def test_no_limit_leaves_half_of_the_ram(tmp_path: Path, monkeypatch) -> None:
    _host(monkeypatch, 64 * GIB)
    assert default_cpu_memory(tmp_path) == 32 * GIB  # no cgroup files at all
    (tmp_path / "memory.max").write_text("max\n")
    assert memory_limit(tmp_path) is None
    assert default_cpu_memory(tmp_path) == 32 * GIB
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory_limit(tmp_path) is None
    (cpu,) = discover(only=["cpu-0"], cgroup_root=tmp_path)
    assert cpu.memory_total == 32 * GIB


def test_a_limit_above_the_ram_is_no_cap(tmp_path: Path, monkeypatch) -> None:
    _host(monkeypatch, 8 * GIB)
    (tmp_path / "memory.max").write_text(f"{100 * GIB}\n")
    assert default_cpu_memory(tmp_path) == 4 * GIB


def test_cpu_memory_set_wins(tmp_path: Path, monkeypatch) -> None:
    _host(monkeypatch, 64 * GIB)
    (tmp_path / "memory.max").write_text(f"{6 * GIB}\n")
    (cpu,) = discover(cpu_memory=GIB, only=["cpu-0"], cgroup_root=tmp_path)
    assert cpu.memory_total == GIB
