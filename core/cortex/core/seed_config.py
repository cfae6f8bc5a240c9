"""The seed's config files, read as they are: its key names are mapped onto cortex's before
validation, and each mapping (or key cortex ignores) is noted for `cortex config check`."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

MIB = 2**20
# Keys of a seed [[models]] entry cortex has no use for: accepted, reported, ignored.
IGNORED_MODEL_KEYS = {
    "min_device_vram_mb": "cortex places by the model's whole memory budget, not per device",
}


def from_seed_gateway(data: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """cortex.toml: the seed's `models_config` (top level or in [gateway]) is `models_file`."""
    data = dict(data)
    gateway = dict(data.get("gateway") or {})
    for where, table in (("models_config", data), ("gateway.models_config", gateway)):
        if "models_config" in table:
            gateway["models_file"] = table.pop("models_config")
            notes.append(f"{where} -> gateway.models_file")
    if gateway:
        data["gateway"] = gateway
    return data


def from_seed_models(data: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """models.toml: seed [[models]] keys and the top-level [aliases] table (alias = "model id")."""
    data = dict(data)
    entries = data.get("models", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError("models: expected [[models]] entries (an array of tables)")
    models = [_model(dict(entry), index, notes) for index, entry in enumerate(entries)]
    aliases = data.pop("aliases", None)
    if aliases is not None and not isinstance(aliases, dict):
        raise ValueError('aliases: expected a table of alias = "model id"')
    if isinstance(aliases, dict):
        by_id = {m.get("id"): m for m in models}
        for alias, target in aliases.items():
            if not isinstance(target, str):
                raise ValueError(f"aliases.{alias}: expected a model id, got {target!r}")
            if target not in by_id:
                raise ValueError(f"aliases.{alias}: {target!r} is no [[models]] id")
            by_id[target].setdefault("aliases", []).append(alias)
            notes.append(f"aliases.{alias} -> models[id={target}].aliases")
    data["models"] = models
    return data


def _model(entry: dict[str, Any], index: int, notes: list[str]) -> dict[str, Any]:
    where = f"models[{index}]"
    if "vram_mb" in entry:
        vram = entry.pop("vram_mb")
        if isinstance(vram, bool) or not isinstance(vram, int | float) or vram < 0:
            raise ValueError(f"{where}.vram_mb: expected a number of MiB, got {vram!r}")
        entry["memory"] = int(vram * MIB)
        notes.append(f"{where}.vram_mb -> memory (MiB)")
    if "residency_priority" in entry:
        entry["priority"] = entry.pop("residency_priority")
        notes.append(f"{where}.residency_priority -> priority")
    limit = entry.pop("limit", None)
    if isinstance(limit, dict):
        for key, target in (
            ("context", "context"),
            ("input", "max_input_tokens"),
            ("output", "max_output_tokens"),
        ):
            if key in limit:
                entry[target] = limit.pop(key)
                notes.append(f"{where}.limit.{key} -> {target}")
        if limit:  # unknown keys stay, so validation names them
            entry["limit"] = limit
    elif limit is not None:
        entry["limit"] = limit
    for key, why in IGNORED_MODEL_KEYS.items():
        if key in entry:
            entry.pop(key)
            notes.append(f"{where}.{key}: not supported, ignored ({why})")
    return entry
