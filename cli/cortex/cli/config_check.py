"""`cortex config check FILE`: validate cortex.toml, neuron.toml or models.toml (seed files
included) and print what cortex understood from it."""

from __future__ import annotations

import tomllib
from pathlib import Path

from cortex.core.catalogue import ModelSpec
from cortex.core.config import (
    ConfigError,
    GatewayConfig,
    ModelsFile,
    NeuronConfig,
    read_config,
)

_GATEWAY_KEYS = {"gateway", "eviction", "neurons", "auth", "models_config"}


def kind_of(path: Path) -> type[GatewayConfig] | type[NeuronConfig] | type[ModelsFile]:
    """Which of the three files this is, from its top-level tables."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return GatewayConfig  # read_config then reports the real problem
    keys = set(data)
    if keys & _GATEWAY_KEYS:  # a cortex.toml, where `neuron` is a typo read as an unknown key
        return GatewayConfig
    if "neuron" in keys:
        return NeuronConfig
    return ModelsFile


def check(path: Path) -> list[str]:
    """The lines `cortex config check` prints; ConfigError when the file cannot be used."""
    kind = kind_of(path)
    config, notes = read_config(path, kind)
    lines = [f"{path}: valid {kind.__doc__}"]
    if isinstance(config, GatewayConfig):
        lines += _gateway(config, path, notes)
    elif isinstance(config, NeuronConfig):
        section = config.neuron
        lines.append(f"  neuron {section.name} on {section.host}:{section.port}")
        lines.append(f"  preload: {', '.join(section.preload) or '-'}")
    lines += [f"  model {_model(spec)}" for spec in config.models]  # type: ignore[union-attr]
    lines += [f"  seed key {note}" for note in notes]
    return lines


def _gateway(config: GatewayConfig, path: Path, notes: list[str]) -> list[str]:
    section = config.gateway
    lines = [f"  API on {section.listen}, metrics on {section.metrics_listen or 'the API port'}"]
    lines += [f"  neuron {n.name} at {n.endpoint}" for n in config.neurons]
    lines.append(f"  auth {'on' if config.auth.enabled else 'off'}, {len(config.auth.keys)} keys")
    if section.models_file is not None:
        models_file = section.models_file
        if not models_file.is_absolute():
            models_file = path.parent / models_file
        if not models_file.is_file():
            raise ConfigError(f"{path}: gateway.models_file: {models_file}: no such file")
        lines.append(f"  models from {models_file}")
        models, more = read_config(models_file, ModelsFile)
        config.models.extend(models.models)
        notes.extend(f"{models_file.name}: {note}" for note in more)
    return lines


def _model(spec: ModelSpec) -> str:
    parts = [f"{spec.id} ({spec.kind}) from {spec.source}"]
    if spec.aliases:
        parts.append(f"aliases {', '.join(spec.aliases)}")
    if spec.memory is not None:
        parts.append(f"memory {spec.memory / 2**20:.0f} MiB")
    if spec.priority:
        parts.append(f"priority {spec.priority}")
    if spec.pinned_on:
        parts.append(f"pinned on {', '.join(spec.pinned_on)}")
    limits = [
        f"{name} {value}"
        for name, value in (
            ("context", spec.context),
            ("input", spec.max_input_tokens),
            ("output", spec.max_output_tokens),
        )
        if value is not None
    ]
    if limits:
        parts.append(f"limits {', '.join(limits)}")
    if spec.cost is not None:
        cost = spec.cost
        parts.append(
            f"cost/Mtok in {cost.input} out {cost.output} "
            f"cache read {cost.cache_read} write {cost.cache_write}"
        )
    return "; ".join(parts)
