"""The GPU check's CPU path, end to end at tiny sizes, so its CUDA run is known to work before a
GPU ever runs it; and its wheel list covers every package a neuron imports beyond torch and
transformers (a lent GPU machine has no registry to fetch a forgotten one)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import pytest

from bench import gpu_wheels

ROOT = Path(__file__).resolve().parents[2]


def test_the_cpu_path_writes_every_phase(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--device", "cpu-0", "--size", "tiny", "--levels", "1,2", "--max-tokens", "6"]
    argv += ["--out", str(out), "--wheels", str(tmp_path / "no-wheels")]
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads((out / "gpu-check.json").read_text())
    assert result["errors"] == []
    phases = result["phases"]
    assert phases["installed"] == {"from_wheels": []}  # nothing missing here
    assert phases["model"]["parameters"] > 0 and phases["model"]["dtype"] == "float32"
    assert phases["neuron ready"]["startup_s"] > 0
    assert phases["chat"]["usage"]["completion_tokens"] > 0 and phases["chat"]["content"]
    assert [level["streams"] for level in result["levels"]] == [1, 2]
    for level in result["levels"]:
        streams = level["streams"]
        # The head never picks end-of-sequence: both sides produce every token asked for.
        assert level["neuron"]["tokens"] == level["generate"]["tokens"] == 6 * streams
        assert level["x"] == level["neuron"]["tokens_per_s"] / level["generate"]["tokens_per_s"]
    assert result["machine"]["torch"]
    # The mixed phase: the long prompts fit the model's context and the neuron's KV budget, the
    # longs outlast the shorts (3x their tokens), every ratio is measured.
    mixed = result["mixed"]
    assert phases["model"]["context"] >= 600 + 18
    assert mixed["long_prompt_tokens"] == [200, 600] and mixed["shorts"] == 16
    assert mixed["shorts_alone"]["short_tokens"] == mixed["mixed"]["short_tokens"] == 16 * 6
    assert mixed["mixed"]["long_tokens"] == mixed["longs_alone"]["long_tokens"] == [18, 18]
    assert mixed["longs_alone"]["shorts_tok_s"] is None
    ratio = mixed["mixed"]["shorts_tok_s"] / mixed["shorts_alone"]["shorts_tok_s"]
    assert mixed["shorts_ratio"] == ratio > 0
    assert len(mixed["longs_ratio"]) == 2 and all(r > 0 for r in mixed["longs_ratio"])
    assert mixed["targets"] == {"shorts_ratio": 0.95, "longs_ratio": 1.0}
    assert phases["mixed"]["shorts mixed/alone"] == round(ratio, 3)


def test_the_neuron_command_runs_from_the_checkout_without_cortex_installed() -> None:
    # The GPU machine has no cortex installed: the check puts the checkout's folders on the path
    # (bench.gpu_check.SOURCES) and starts `python -m cortex.cli neuron`. Here cortex is
    # installed (an editable .pth), so without -S every import would find it there; -S skips the
    # .pth files and site-packages is added by hand for the third-party packages.
    import site

    from bench.gpu_check import SOURCES

    path = [*map(str, SOURCES), *site.getsitepackages()]
    code = (
        f"import runpy, sys; sys.path[:0] = {path!r}\n"
        "import cortex\n"
        "assert all(p.startswith(tuple(sys.path[:%d])) for p in cortex.__path__), cortex.__path__\n"
        "sys.argv = ['cortex', 'neuron', '--help']\n"
        "runpy.run_module('cortex.cli', run_name='__main__', alter_sys=True)" % len(SOURCES)
    )
    run = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--preload" in run.stdout  # the flag the check starts its neuron with


def test_the_carried_wheels_cover_what_a_neuron_imports() -> None:
    def third_party(code: str) -> set[str]:
        listing = "import sys; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
        run = subprocess.run(
            [sys.executable, "-c", f"{code}\n{listing}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        names = set(run.stdout.split()) - set(sys.stdlib_module_names) - {"cython_runtime"}
        return {name for name in names if not name.startswith("_")}  # __main__, _cython_3_2_4...

    # What the GPU machine has: torch, transformers and all they require.
    installed, todo = set(), ["torch", "transformers"]
    while todo:
        dist = todo.pop()
        if dist in installed:
            continue
        try:
            needs = [r for r in requires(dist) or [] if "extra ==" not in r]
        except PackageNotFoundError:  # a requirement for another platform
            continue
        installed.add(dist)
        todo += [re.split(r"[ <>=!~;\[(]", r)[0].lower().replace("_", "-") for r in needs]
    present = {
        module
        for module, dists in packages_distributions().items()
        if any(d.lower().replace("_", "-") in installed for d in dists)
    }
    neuron = third_party(
        "import cortex.cli.main, cortex.cli.commands, cortex.neuron.server\n"
        "import cortex.neuron.runtime, cortex.neuron.grammar, cortex.neuron.mapped_weights\n"
        "import accelerate, llguidance, llguidance.hf"
    )
    wheels = {d.lower() for d in (*gpu_wheels.PURE, *gpu_wheels.COMPILED)}
    carried = {  # every module the carried distributions provide (attrs: attr and attrs)
        module
        for module, dists in packages_distributions().items()
        if any(d.lower().replace("_", "-") in wheels for d in dists)
    }
    # Imported only where installed: uvicorn's extras, Pillow by transformers, and trio (with
    # its outcome, sortedcontainers, attrs) by an HTTP core's backend here, where selenium
    # brought it.
    optional = {"uvloop", "watchfiles", "websockets", "dotenv", "PIL"}
    optional |= {"trio", "outcome", "sortedcontainers", "attr", "attrs"}
    uncovered = neuron - present - carried - optional - {"cortex"}
    assert not uncovered, f"a neuron imports these, and no carried wheel provides them: {uncovered}"
    assert not gpu_wheels.missing()  # every listed module's name is right (it imports here)


def test_what_is_missing_is_installed_from_the_wheels_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(gpu_wheels.PURE, "cortex-no-such-dist", "cortex_no_such_module")
    assert gpu_wheels.missing() == ["cortex-no-such-dist"]
    with pytest.raises(SystemExit, match="cortex-no-such-dist"):
        gpu_wheels.install_missing(None)
    (tmp_path / "wheels").mkdir()
    # No index to fall back on: a wheel not carried is an error, not a download.
    with pytest.raises(subprocess.CalledProcessError) as failed:
        gpu_wheels.install_missing(tmp_path / "wheels")
    assert "--no-index" in failed.value.cmd


def test_a_failing_environment_install_falls_back_to_a_target_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lent machine's environment may refuse the install (read-only, conflicting): the carried
    # closure then goes into a folder put on sys.path and PYTHONPATH. A real pip --target install
    # of a real (tiny) wheel; only the install into this environment is made to fail.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    info = "cortex_probe-0.1.dist-info"
    files = {
        "cortex_probe/__init__.py": "VALUE = 7\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: cortex-probe\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(wheels / "cortex_probe-0.1-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    monkeypatch.setitem(gpu_wheels.PURE, "cortex-probe", "cortex_probe")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    real_run = subprocess.run

    def read_only_environment(command: list[str], **kwargs: object) -> object:
        if "--target" not in command:
            raise subprocess.CalledProcessError(1, command)
        return real_run(command, **kwargs)

    monkeypatch.setattr(gpu_wheels.subprocess, "run", read_only_environment)
    with pytest.raises(subprocess.CalledProcessError):  # no fallback given: the error stands
        gpu_wheels.install_missing(wheels)
    site = tmp_path / "site"
    assert gpu_wheels.install_missing(wheels, fallback=site) == ["cortex-probe"]
    assert (site / "cortex_probe" / "__init__.py").is_file()
    assert sys.path[0] == str(site) and gpu_wheels.missing() == []
    assert os.environ["PYTHONPATH"] == f"{site}{os.pathsep}/elsewhere"
    child = real_run(
        [sys.executable, "-c", "import cortex_probe; print(cortex_probe.VALUE)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == "7"
