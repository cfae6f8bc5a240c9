"""Config files (cortex.toml, neuron.toml, models.toml) as pydantic models, with errors naming the key."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cortex.core.catalogue import ByteSize, Dtype, ModelSpec, Seconds, check_names
from cortex.core.placement.model import Strategy
from cortex.core.seed_config import from_seed_gateway, from_seed_models

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {value!r}")
    return value


class NeuronSection(_Section):
    name: str = Field(default_factory=socket.gethostname, description="node name in the fleet")
    host: str = "127.0.0.1"
    port: int = Field(default=13131, gt=0, lt=65536)
    admin_token: str | None = Field(
        default=None, repr=False, description="required by lifecycle endpoints"
    )
    admin_token_file: Path | None = Field(
        default=None,
        description="file holding admin_token (a mounted Secret); keeps it out of `ps` and configs",
    )
    preload: list[str] = Field(default_factory=list, description="model ids loaded at start")
    devices: list[str] = Field(
        default_factory=list,
        description="restrict to these workers (cpu-0, cuda-dev-0); all if empty",
    )
    cpu_memory: ByteSize | None = Field(
        default=None,
        description="memory the cpu-0 device may use for models (weights and KV cache); default "
        "half of the RAM, or of the container's memory limit if lower",
    )
    dtype: Dtype = Field(default="auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    kv_tokens: int = Field(
        default=16384,
        ge=256,
        description="KV cache budget per chat model in tokens (what running sequences hold: "
        "prompt + generated so far); reserved in memory at load, a quarter of it keeps "
        "reusable prefixes",
    )
    max_running: int = Field(
        default=32, ge=1, description="sequences generating at once, per model"
    )
    max_queue: int = Field(default=128, ge=0, description="requests waiting for a slot, per model")
    max_per_principal: int | None = Field(
        default=None,
        ge=1,
        description="running slots one principal (API key, else client address) may hold, per "
        "model; unset: all, though a freed slot always goes to whoever holds fewest",
    )
    prefill_chunk: int = Field(
        default=256,
        ge=16,
        description="prompt tokens read per engine step: smaller keeps running streams' token "
        "gaps short while a long prompt is read, larger reads it in fewer passes",
    )
    queue_timeout: Seconds = Field(
        default=30.0, description="longest wait for a slot before a 429 queue_timeout"
    )
    prompt_timeout: Seconds = Field(
        default=10.0,
        description="longest one request's prompt may take to render and tokenize before 400",
    )
    shutdown_grace: Seconds = Field(
        default=30.0, description="on SIGTERM, how long in-flight requests may take to finish"
    )
    max_body_bytes: ByteSize = Field(default=8 * 2**20, description="larger bodies get 413")
    max_tokens_limit: int = Field(default=32768, ge=1, description="largest max_tokens accepted")
    strict_max_tokens: bool = Field(
        default=False,
        description="a max_tokens beyond what the prompt leaves of the context is a 400 (vLLM), "
        "not clamped (llama.cpp, Ollama); a catalogue entry's or the gateway's setting wins",
    )
    hf_cache: Path | None = Field(
        default=None, description="Hugging Face hub cache for hf: sources; the HF default if unset"
    )
    cache_dir: Path = Field(
        default=Path("~/.cache/cortex"), description="converted-weights cache (GGUF -> safetensors)"
    )
    allowed_paths: list[Path] | None = Field(
        default=None,
        description="the only places file: sources may load from; unset: cache_dir, hf_cache and "
        "the file: sources this neuron's catalogue names (docs/security.md)",
    )

    def admin_secret(self) -> str | None:
        """admin_token, or the contents of admin_token_file, read on each call so a rotated
        file takes effect without a restart."""
        if self.admin_token or self.admin_token_file is None:
            return self.admin_token
        try:
            token = self.admin_token_file.expanduser().read_text().strip()
        except OSError as exc:
            raise ConfigError(f"admin_token_file {self.admin_token_file}: {exc.strerror}") from None
        if not token:
            raise ConfigError(f"admin_token_file {self.admin_token_file}: empty")
        return token

    @property
    def lifecycle_open(self) -> bool:
        """Load and unload need no token, and hosts other than this one can reach them."""
        return not (self.admin_token or self.admin_token_file) and not is_loopback(self.host)


def admin_token_from_env() -> str | None:
    """CORTEX_ADMIN_TOKEN without surrounding whitespace (a Secret made with --from-file keeps the
    file's newline), as admin_token_file's token is read; None when unset or blank."""
    return os.environ.get("CORTEX_ADMIN_TOKEN", "").strip() or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it resolves beyond this machine


class NeuronConfig(_Section):
    """neuron.toml"""

    neuron: NeuronSection = Field(default_factory=NeuronSection)
    models: list[ModelSpec] = Field(default_factory=list, description="extra catalogue entries")


class GatewaySection(_Section):
    listen: str = "127.0.0.1:31313"
    metrics_listen: str | None = Field(
        default="127.0.0.1:31314", description="Prometheus endpoint; also /metrics on listen"
    )
    models_file: Path | None = Field(default=None, description="models.toml, relative to this file")
    request_timeout: Seconds = 600.0
    load_timeout: Seconds = Field(default=120.0, description="longest wait for an on-demand load")
    max_body_bytes: ByteSize = 16 * 2**20
    poll_interval: Seconds = 2.0
    unhealthy_after: int = Field(default=3, ge=1, description="consecutive failed polls")
    strict_max_tokens: bool | None = Field(
        default=None,
        description="a max_tokens beyond what the prompt leaves of the context is a 400, not "
        "clamped; a catalogue entry's setting wins; unset: each neuron's own setting",
    )
    shutdown_grace: Seconds = Field(
        default=30.0, description="on SIGTERM, how long running streams may take to finish"
    )
    usage_log: bool = Field(
        default=False,
        description="log one line per request (logger cortex.usage): key, model, neuron, "
        "surface, outcome, tokens, duration and time to first token; never the content",
    )

    _listen = field_validator("listen")(_check_listen)

    @field_validator("metrics_listen")
    @classmethod
    def _metrics(cls, value: str | None) -> str | None:
        return None if not value else _check_listen(value)


class EvictionSection(_Section):
    strategy: Strategy = Field(
        default="cost",
        description="which replicas give way when a neuron is full: `lru`, `priority`, or `cost`"
        " (what is asked for least goes; docs/benchmarks.md, P4)",
    )
    defrag_after_cycles: int = Field(
        default=0,
        ge=0,
        description="0 turns periodic defragmentation off (`cost` defragments on every plan)",
    )


class NeuronEntry(_Section):
    name: str = Field(min_length=1)
    endpoint: str = Field(pattern=r"^https?://", description="http(s)://host:port of the neuron")
    admin_token: str | None = Field(default=None, repr=False)
    labels: dict[str, str] = Field(default_factory=dict, description="matched by neuron selectors")


class ApiKey(_Section):
    key: str | None = Field(
        default=None, repr=False, description="the secret; or key_env, or key_file"
    )
    key_env: str | None = Field(default=None, description="environment variable holding the key")
    key_file: Path | None = Field(
        default=None, description="file holding the key (a mounted Kubernetes Secret entry)"
    )
    name: str = Field(
        min_length=1, description="who the key belongs to (shown in logs, not the key)"
    )
    models: list[str] = Field(default_factory=list, description="allowlist; empty allows all")
    admin: bool = Field(
        default=False,
        description="an admin key also reads the fleet view (/, /fleet), /docs, /openapi.json "
        "and /health's details (docs/security.md)",
    )
    budget_tokens: int | None = Field(default=None, ge=0, description="tokens allowed")
    budget_window: Seconds | None = Field(
        default=None, description="rolling window for budget_tokens; unset = a balance"
    )
    max_in_flight: int | None = Field(
        default=None, ge=1, description="requests this key may have running at once; more: 429"
    )

    def secret(self) -> str:
        value = self.key or (os.environ.get(self.key_env) if self.key_env else None)
        if not value and self.key_file is not None:
            try:
                value = self.key_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"auth key {self.name!r}: key_file {self.key_file}: {exc.strerror}"
                ) from None
        if not value:
            raise ConfigError(
                f"auth key {self.name!r}: set key, key_env to a non-empty variable, "
                "or key_file to a non-empty file"
            )
        # A header carries bytes a server reads as Latin-1, and a client's key loses its spaces
        # at the ends: such a secret would never match (the message never shows it).
        if not (value.isascii() and value.isprintable()) or value != value.strip():
            raise ConfigError(
                f"auth key {self.name!r}: its secret may hold printable ASCII only, with no "
                "spaces at its ends"
            )
        return value


class AuthSection(_Section):
    enabled: bool = False
    keys: list[ApiKey] = Field(default_factory=list)
    neuron_admin_token: str | None = Field(
        default=None,
        repr=False,
        description="sent to neurons on load/unload, and with the principal of each request "
        "(a neuron trusts the principal it is told only with its token)",
    )
    neuron_admin_token_file: Path | None = Field(
        default=None, description="neuron_admin_token from this file (read at start)"
    )
    spend_db: Path = Field(
        default=Path("~/.cache/cortex/gateway.sqlite3"),
        description="SQLite file keeping the keys' token spend across restarts (opened only when "
        'a key has a budget); ":memory:" keeps it in memory',
    )
    spend_configmap: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="on Kubernetes, keep the spend in this ConfigMap of the gateway's namespace "
        "instead of spend_db: every gateway replica shares it, and it outlives the pods",
    )

    @model_validator(mode="after")
    def _one_neuron_token(self) -> AuthSection:
        if self.neuron_admin_token and self.neuron_admin_token_file:
            raise ValueError("set neuron_admin_token or neuron_admin_token_file, not both")
        return self

    @field_validator("keys")
    @classmethod
    def _key_names(cls, keys: list[ApiKey]) -> list[ApiKey]:
        # A key's name is what logs, metrics, spend and `cortex keys reset` know it by.
        _unique("auth key name", [key.name for key in keys])
        return keys

    def neuron_admin_secret(self) -> str | None:
        """neuron_admin_token, or the contents of neuron_admin_token_file."""
        if self.neuron_admin_token_file is None:
            return self.neuron_admin_token
        path = self.neuron_admin_token_file.expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"neuron_admin_token_file {path}: {exc.strerror}") from None
        if not token:
            raise ConfigError(f"neuron_admin_token_file {path}: empty")
        return token


class GatewayConfig(_Section):
    """cortex.toml"""

    gateway: GatewaySection = Field(default_factory=GatewaySection)
    eviction: EvictionSection = Field(default_factory=EvictionSection)
    neurons: list[NeuronEntry] = Field(default_factory=list)
    auth: AuthSection = Field(default_factory=AuthSection)
    models: list[ModelSpec] = Field(default_factory=list, description="inline catalogue entries")

    _models = field_validator("models")(check_names)

    @field_validator("neurons")
    @classmethod
    def _neuron_names(cls, neurons: list[NeuronEntry]) -> list[NeuronEntry]:
        _unique("neuron name", [neuron.name for neuron in neurons])
        return neurons


class ModelsFile(_Section):
    """models.toml"""

    models: list[ModelSpec] = Field(default_factory=list)

    _models = field_validator("models")(check_names)


def _unique(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} {name!r} is used twice")
        seen.add(name)


Config = TypeVar("Config", bound=BaseModel)


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def parse_config(data: dict[str, object], model: type[Config], origin: str) -> Config:
    """Validate parsed TOML; every problem is reported as `origin: key.path: message`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            message = error["msg"]
            if error["type"] == "extra_forbidden":
                message = "unknown key"
            elif error["type"] == "value_error":  # the config's own checks say what is wrong
                message = message.removeprefix("Value error, ")
            lines.append(f"{origin}: {_key_path(error['loc'])}: {message}")
        raise ConfigError("\n".join(lines)) from None


def read_config(path: str | Path, model: type[Config]) -> tuple[Config, list[str]]:
    """Read and validate a TOML config file, the seed's key names included; also returns how
    seed keys were understood (`vram_mb -> memory`, or that a key is ignored)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text, as TOML must be") from None
    except OSError as exc:  # permission denied, an I/O error
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    notes: list[str] = []
    try:
        if model is GatewayConfig:
            data = from_seed_gateway(data, notes)
        if "models" in data or "aliases" in data:
            data = from_seed_models(data, notes)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse_config(data, model, str(path)), notes


def load_config(path: str | Path, model: type[Config]) -> Config:
    """Read and validate a TOML config file; seed keys it ignores are logged once."""
    config, notes = read_config(path, model)
    for note in notes:
        if "not supported" in note:
            log.warning("%s: %s", path, note)
    return config


def load_gateway_config(path: str | Path | None) -> GatewayConfig:
    """cortex.toml plus the models.toml it names (relative paths resolve against cortex.toml)."""
    if path is None:
        return GatewayConfig()
    config = load_config(path, GatewayConfig)
    models_file = config.gateway.models_file
    if models_file is not None:
        if not models_file.is_absolute():
            models_file = Path(path).parent / models_file
        if not models_file.is_file():
            raise ConfigError(f"{path}: gateway.models_file: {models_file}: no such file")
        config.models.extend(load_config(models_file, ModelsFile).models)
    return config
