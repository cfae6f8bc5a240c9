"""Real processes for the fault suite: neurons and gateways started as `cortex` subprocesses.

bench/ (a top-level package of the checkout, not installed) already knows how to start a server,
wait on its readiness with a deadline and stop its whole process group: reuse it.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.append(ROOT)
sys.path.append(str(Path(__file__).parents[1] / "neuron"))  # tiny_models
