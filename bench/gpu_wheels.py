"""The packages a neuron needs beyond torch and transformers, carried as wheels to a GPU machine.

A lent GPU machine has torch and transformers and no registry (docs/benchmarks.md, "GPU check").
`download()` runs here: it fetches the wheels of this environment's versions (no dependencies
resolved: the list is the closure), pure-Python ones once, compiled ones for CPython 3.11-3.13 on
x86_64 Linux. `install_missing()` runs there: it installs, from those wheels only, the packages
whose module is not importable. Stdlib only: it runs before anything is installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# distribution -> the module it provides (what is checked on the GPU machine)
PURE = {
    "fastapi": "fastapi",
    "starlette": "starlette",
    "annotated-doc": "annotated_doc",
    "pydantic": "pydantic",
    "typing-inspection": "typing_inspection",
    "annotated-types": "annotated_types",
    "typing-extensions": "typing_extensions",
    "httpx": "httpx",
    "httpcore": "httpcore",
    "h11": "h11",
    "anyio": "anyio",
    "idna": "idna",
    "certifi": "certifi",
    "sniffio": "sniffio",
    "uvicorn": "uvicorn",
    "click": "click",
    "prometheus-client": "prometheus_client",
    "rich": "rich",
    "markdown-it-py": "markdown_it",
    "mdurl": "mdurl",
    "pygments": "pygments",
    "accelerate": "accelerate",
    "opentelemetry-api": "opentelemetry",  # fastapi's, since 0.13x
}
COMPILED = {
    "pydantic-core": "pydantic_core",
    "pyyaml": "yaml",
    "psutil": "psutil",
    "safetensors": "safetensors",
    "llguidance": "llguidance",
    "httptools": "httptools",  # NeuronClient's inference transport parses with it
}
PYTHONS = ("3.11", "3.12", "3.13")
PLATFORMS = (*(f"manylinux_2_{n}_x86_64" for n in (17, 28, 31, 34)), "manylinux2014_x86_64")


def missing() -> list[str]:
    """Distributions whose module cannot be imported here."""
    wanted = {**PURE, **COMPILED}
    return [dist for dist, module in wanted.items() if importlib.util.find_spec(module) is None]


def install_missing(wheels: Path | None, fallback: Path | None = None) -> list[str]:
    """Install what is missing from `wheels` (no index); returns what was installed.

    Into this interpreter's environment, its installed packages kept where they satisfy the
    carried ones. If that fails (a read-only or conflicting environment) and `fallback` is given,
    the carried closure goes into that folder instead, which is put first on `sys.path` and on
    PYTHONPATH (for the processes started after)."""
    absent = missing()
    if not absent:
        return []
    if wheels is None or not wheels.is_dir():
        raise SystemExit(f"missing {', '.join(absent)} and no wheels folder to install them from")
    # Dependencies resolve against what is installed and the carried wheels, never an index.
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index"]
    command += ["--find-links", str(wheels)]
    try:
        subprocess.run([*command, *absent], check=True)
    except subprocess.CalledProcessError:
        if fallback is None:
            raise
        print(f"installing into the environment failed; into {fallback} instead", file=sys.stderr)
        # --target ignores what is installed: the whole closure comes from the carried wheels.
        subprocess.run([*command, "--upgrade", "--target", str(fallback), *absent], check=True)
        sys.path.insert(0, str(fallback))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(fallback), os.environ.get("PYTHONPATH")])
        )
    importlib.invalidate_caches()
    return absent


def pinned(dist: str) -> str:
    try:
        return f"{dist}=={version(dist)}"
    except PackageNotFoundError:
        return dist


def download(target: Path) -> list[Path]:
    """Fetch every wheel into `target` (this environment's versions); returns the files."""
    target.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(target)]
    subprocess.run([*pip, "--only-binary=:all:", *map(pinned, PURE)], check=True)
    for python in PYTHONS:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        where = ["--python-version", python, "--implementation", "cp", *platforms]
        subprocess.run([*pip, "--only-binary=:all:", *where, *map(pinned, COMPILED)], check=True)
    files = sorted(target.glob("*.whl"))
    total = sum(f.stat().st_size for f in files)
    print(f"{len(files)} wheels, {total / 2**20:.1f} MiB in {target}")
    return files


if __name__ == "__main__":
    download(Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu-wheels"))
