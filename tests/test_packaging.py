"""The shape of cortex's dependencies (docs/architecture.md, "Packages and layers"): the base
install carries core and the `cortex` command's client side, each component's extra its server
stack, only the neuron's brings torch; and what each package imports is what its install brings."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
HEAVY = {"torch", "transformers", "accelerate", "gguf", "safetensors", "sentencepiece"}
SERVER = {"fastapi", "starlette", "uvicorn", "prometheus-client"}
# Where each package's source lives, and the extra an install of it adds to the base.
PACKAGES = {
    "core": (REPO / "core" / "cortex" / "core", None),
    "cli": (REPO / "cli" / "cortex" / "cli", None),
    "gateway": (REPO / "gateway" / "cortex" / "gateway", "gateway"),
    "neuron": (REPO / "neuron-image" / "cortex" / "neuron", "neuron"),
    "operator": (REPO / "operator" / "cortex" / "operator", "operator"),
}
# The one module of core that needs a server library (.importlinter says why): the gateway's
# and the neuron's installs, which run it, bring uvicorn.
CORE_SERVER_MODULES = {"cortex.core.shutdown"}


def name_of(requirement: str) -> str:
    return Requirement(requirement).name.lower().replace("_", "-")


def closure(requirements: list[str], extras: set[str]) -> set[str]:
    """Names of every distribution these requirements pull in, as installed here."""
    seen: set[str] = set()
    queue = [(r, extras) for r in requirements]
    while queue:
        text, active = queue.pop()
        requirement = Requirement(text)
        if requirement.marker and not any(
            requirement.marker.evaluate({"extra": e}) for e in (active or {""})
        ):
            continue
        name = requirement.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            below = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        queue += [(r, set(requirement.extras)) for r in below]
    return seen


def install(extra: str | None) -> set[str]:
    """Every distribution `pip install cortex[extra]` brings (the base alone for None)."""
    wanted = list(PROJECT["dependencies"])
    wanted += PROJECT["optional-dependencies"][extra] if extra else []
    return closure(wanted, set())


def test_the_base_dependencies_are_cores_and_the_command_lines() -> None:
    base = {name_of(r) for r in PROJECT["dependencies"]}
    # httptools: NeuronClient's inference calls (core/http_connection.py) parse with it.
    assert base == {"pydantic", "httpx", "httptools", "pyyaml", "rich"}
    assert not install(None) & (HEAVY | SERVER | {"kopf", "kubernetes"})


def test_the_gateway_extra_brings_its_server_stack_and_no_torch() -> None:
    gateway = install("gateway")
    assert gateway >= SERVER
    assert not gateway & (HEAVY | {"kopf", "kubernetes"}), gateway & HEAVY


def test_the_neuron_extra_brings_torch_and_its_own_server_stack() -> None:
    neuron = install("neuron")
    assert {"torch", "transformers", "llguidance"} | SERVER <= neuron
    assert not neuron & {"kopf", "kubernetes"}


def test_the_operator_extra_brings_kopf_and_no_server_stack_or_torch() -> None:
    operator = install("operator")
    assert {"kopf", "kubernetes", "prometheus-client"} <= operator  # its /metrics
    assert not operator & (HEAVY | {"fastapi", "uvicorn"})


def third_party_imports(source: Path, *, module_level_only: bool) -> dict[str, set[str]]:
    """{top-level name imported: the modules importing it}, standard library and cortex left out.
    Imports under `if TYPE_CHECKING:` are left out too: they never run."""
    found: dict[str, set[str]] = {}
    for path in sorted(source.rglob("*.py")):
        module = ".".join(path.relative_to(source.parent.parent).with_suffix("").parts)
        tree = ast.parse(path.read_text())
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        skipped = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        for node in nodes:
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in {"cortex", "__future__"}:
                    found.setdefault(top, set()).add(module)
    return found


@functools.cache
def providers() -> Mapping[str, list[str]]:
    """{top-level importable name: the installed distributions providing it}."""
    return importlib.metadata.packages_distributions()


def distributions(top: str) -> set[str]:
    names = providers().get(top, [])
    assert names, f"{top}: imported, but no installed distribution provides it"
    return {n.lower().replace("_", "-") for n in names}


@pytest.mark.parametrize("package", PACKAGES)
def test_every_library_a_package_imports_comes_with_its_install(package: str) -> None:
    """Every import of core, gateway, neuron and operator (lazy ones too) and every module-level
    import of the CLI (its commands import their component's libraries when they run) is in
    what `pip install cortex[<its extra>]` brings."""
    source, extra = PACKAGES[package]
    brought = install(extra)
    imports = third_party_imports(source, module_level_only=package == "cli")
    assert imports, "the check found no import at all"
    missing = {
        top: sorted(modules - CORE_SERVER_MODULES)
        for top, modules in imports.items()
        if not distributions(top) & brought and modules - CORE_SERVER_MODULES
    }
    assert not missing, f"imported by cortex.{package}, missing from its install: {missing}"


def test_the_import_check_catches_a_library_outside_the_install() -> None:
    imports = third_party_imports(PACKAGES["gateway"][0], module_level_only=False)
    assert "fastapi" in imports and not distributions("fastapi") & install(None)


IMPORTS_NOTHING_HEAVY = """
import importlib, pkgutil, sys
import cortex.core

# rich is not here: httpx imports it whenever it is installed (for httpx's own command line).
HEAVY = ("fastapi", "starlette", "uvicorn", "torch", "transformers", "prometheus_client", "kopf",
         "kubernetes")
skip = set(sys.argv[1:])
for module in pkgutil.walk_packages(cortex.core.__path__, "cortex.core."):
    if module.name not in skip:
        importlib.import_module(module.name)
import cortex.cli.main
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
assert not loaded, loaded
print("imported", len([m for m in sys.modules if m.startswith("cortex.")]), "cortex modules")
"""


def test_core_and_the_command_line_import_no_heavy_library() -> None:
    """Every module of cortex.core, and the `cortex` command's entry point, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS_NOTHING_HEAVY, *CORE_SERVER_MODULES],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout


def test_the_heavy_import_check_bites() -> None:
    script = IMPORTS_NOTHING_HEAVY.replace("import cortex.cli.main", "import cortex.gateway.app")
    done = subprocess.run(
        [sys.executable, "-c", script, *CORE_SERVER_MODULES],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "'fastapi'" in done.stderr


BASE_INSTALL = """
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"fastapi", "starlette", "uvicorn", "prometheus_client", "torch",
                                  "transformers", "kopf", "kubernetes"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from cortex.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def base_cortex(*args: str) -> subprocess.CompletedProcess[str]:
    """`cortex ARGS` as on a base install: no component's server stack importable."""
    return subprocess.run(
        [sys.executable, "-c", BASE_INSTALL, *args], capture_output=True, text=True, timeout=120
    )


def test_a_base_install_checks_a_config() -> None:
    done = base_cortex("config", "check", str(REPO / "examples" / "cortex.toml"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        ("gateway", "gateway"),
        ("neuron", "neuron"),
        ("up", "gateway,neuron"),
        ("operator", "operator"),
    ],
)
def test_a_component_command_names_the_extra_it_needs(command: str, extra: str) -> None:
    ports = {
        "gateway": ["--port", free_port(), "--metrics-port", free_port()],
        "up": ["--port", free_port(), "--metrics-port", free_port()],
        "neuron": ["--port", free_port()],
    }
    done = base_cortex(command, *ports.get(command, []))
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()  # one line, no traceback
    assert f"pip install 'cortex[{extra}]'" in line, line


def wheel_layout(site: Path) -> None:
    """The wheel's files, laid out under `site` as pyproject's hatch target builds them."""
    wheel = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    target = wheel["targets"]["wheel"]
    for include in target["only-include"]:
        source = next(s for s in target["sources"] if include.startswith(f"{s}/"))
        shutil.copytree(
            REPO / include,
            site / include.removeprefix(f"{source}/"),
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__"),
        )


def cortex_from(
    where: Path, *args: str, path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if path is not None:
        env["PYTHONPATH"] = str(path)
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", *args],
        capture_output=True, text=True, timeout=120, cwd=where, env=env,
    )  # fmt: skip


def test_bench_outside_a_checkout_says_where_benchmarks_run(tmp_path: Path) -> None:
    """An installed cortex has no bench/ (its tools are the dev extra's): one line, exit 2, not
    `No module named bench` from a child python."""
    site = tmp_path / "site"
    wheel_layout(site)
    assert (site / "cortex" / "cli" / "commands.py").is_file() and not (site / "bench").exists()
    done = cortex_from(tmp_path, "bench", "--list", path=site)
    assert done.returncode == 2, done
    (line,) = done.stderr.strip().splitlines()
    assert "source checkout" in line and "make bench" in line, line


def test_bench_in_a_checkout_runs_from_any_directory(tmp_path: Path) -> None:
    paths = [REPO / part for part in ("cli", "core", "gateway", "neuron-image", "operator")]
    done = cortex_from(tmp_path, "bench", "--list", path=Path(os.pathsep.join(map(str, paths))))
    assert done.returncode == 0, done.stderr
    assert "gateway" in done.stdout and "P1 gateway overhead" in done.stdout
