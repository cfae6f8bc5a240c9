"""Config files: the shipped examples validate, and every mistake is reported by key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from cortex.core.catalogue import (
    ModelSpec,
    merge_catalogues,
    parse_bytes,
    parse_seconds,
    resolve_alias,
)
from cortex.core.config import (
    AuthSection,
    ConfigError,
    GatewayConfig,
    NeuronConfig,
    load_config,
    load_gateway_config,
    read_config,
)

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_examples_validate() -> None:
    neuron = load_config(EXAMPLES / "neuron.toml", NeuronConfig)
    assert neuron.neuron.port == 13131 and neuron.neuron.cpu_memory == 8 * 2**30
    assert neuron.neuron.queue_timeout == 30.0
    gateway = load_gateway_config(EXAMPLES / "cortex.toml")
    assert [n.name for n in gateway.neurons] == ["gpu-node-a", "gpu-node-b"]
    assert gateway.eviction.strategy == "cost" and gateway.auth.keys[0].budget_window == 86400
    assert {m.id for m in gateway.models} >= {"smollm2-135m-instruct", "qwen2.5-7b-instruct"}
    assert next(m for m in gateway.models if m.id.startswith("qwen")).memory == 18 * 2**30


@pytest.mark.parametrize(
    ("text", "model", "message"),
    [
        (
            "[gateway]\nlisten = 'nohost'\n",
            GatewayConfig,
            "gateway.listen: expected host:port",
        ),
        ("[gateway]\nlistn = '1:2'\n", GatewayConfig, "gateway.listn: unknown key"),
        (
            "[eviction]\nstrategy = 'fifo'\n",
            GatewayConfig,
            "eviction.strategy: Input should be 'lru', 'priority' or 'cost'",
        ),
        ("[[neurons]]\nname = 'a'\nendpoint = 'ftp://x'\n", GatewayConfig, "neurons[0].endpoint"),
        ("[[models]]\nid = 'm'\n", GatewayConfig, "models[0].source: Field required"),
        (
            "[[models]]\nid = 'm'\nsource = 'pkg:x/y'\nmemory = 'lots'\n",
            GatewayConfig,
            "models[0].memory",
        ),
        ("[neuron]\nport = 'abc'\n", NeuronConfig, "neuron.port"),
        ("[neuron]\nmax_running = 0\n", NeuronConfig, "neuron.max_running"),
        ("[neuron\n", NeuronConfig, "not valid TOML"),
    ],
)
def test_errors_name_the_bad_key(tmp_path: Path, text: str, model: type, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, model)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_cost_eviction_strategy_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "cortex.toml"
    path.write_text("[eviction]\nstrategy = 'cost'\n")
    assert load_gateway_config(path).eviction.strategy == "cost"


def test_missing_file_and_missing_models_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml", NeuronConfig)
    config = tmp_path / "cortex.toml"
    config.write_text("[gateway]\nmodels_file = 'nope.toml'\n")
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file"):
        load_gateway_config(config)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("2GiB", 2 * 2**30), ("512 MB", 512 * 10**6), (1024, 1024), ("1.5k", 1500)],
)
def test_byte_sizes(value: object, expected: int) -> None:
    assert parse_bytes(value) == expected


@pytest.mark.parametrize(("value", "expected"), [("30s", 30), ("10m", 600), ("1h", 3600), (5, 5)])
def test_durations(value: object, expected: float) -> None:
    assert parse_seconds(value) == expected


def test_an_api_key_can_come_from_a_file(tmp_path: Path) -> None:
    """A Kubernetes Secret mounted as files (the Helm chart's gateway) supplies keys this way."""
    (tmp_path / "alice").write_text("sk-alice-from-secret\n")
    config = GatewayConfig.model_validate(
        {"auth": {"keys": [{"name": "alice", "key_file": str(tmp_path / "alice")}]}}
    )
    assert config.auth.keys[0].secret() == "sk-alice-from-secret"
    missing = GatewayConfig.model_validate(
        {"auth": {"keys": [{"name": "bob", "key_file": str(tmp_path / "bob")}]}}
    )
    with pytest.raises(ConfigError, match=r"auth key 'bob': key_file .*bob: No such file"):
        missing.auth.keys[0].secret()
    (tmp_path / "empty").write_text("\n")
    empty = GatewayConfig.model_validate(
        {"auth": {"keys": [{"name": "carol", "key_file": str(tmp_path / "empty")}]}}
    )
    with pytest.raises(ConfigError, match="key_file to a non-empty file"):
        empty.auth.keys[0].secret()


@pytest.mark.parametrize("secret", ["sk-clé-1", "sk-pad ", " sk-pad", "sk-tab\t", "sk-\x07"])
@pytest.mark.parametrize("source", ["key", "key_env", "key_file"])
def test_a_secret_no_client_could_present_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret: str, source: str
) -> None:
    """Non-ASCII bytes reach the gateway as Latin-1 and spaces at the ends are stripped from
    the key presented: such a key would pass the config and never authenticate."""
    monkeypatch.setenv("CORTEX_TEST_ODD_KEY", secret)
    (tmp_path / "odd").write_text(secret)
    where = {"key": secret, "key_env": "CORTEX_TEST_ODD_KEY", "key_file": str(tmp_path / "odd")}
    key = GatewayConfig.model_validate(
        {"auth": {"keys": [{"name": "odd", source: where[source]}]}}
    ).auth.keys[0]
    if source == "key_file" and secret.strip() != secret and secret.strip().isprintable():
        assert key.secret() == secret.strip()  # a file's line ending, or its spaces, go
        return
    with pytest.raises(
        ConfigError, match="auth key 'odd': its secret may hold printable ASCII"
    ) as caught:
        key.secret()
    assert secret not in str(caught.value)


def test_the_neuron_admin_token_comes_from_one_place(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert AuthSection(neuron_admin_token_file=token).neuron_admin_secret() == "s3cret"
    assert AuthSection(neuron_admin_token="t").neuron_admin_secret() == "t"
    with pytest.raises(ValidationError, match="not both"):
        AuthSection(neuron_admin_token="t", neuron_admin_token_file=token)
    with pytest.raises(ConfigError, match="neuron_admin_token_file"):
        AuthSection(neuron_admin_token_file=tmp_path / "missing").neuron_admin_secret()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            "[[neurons]]\nname='a'\nendpoint='http://x:1'\n[[neurons]]\nname='a'\nendpoint='http://y:1'\n",
            "neurons: neuron name 'a' is used twice",
        ),
        (
            "[[auth.keys]]\nname='a'\nkey='s'\n[[auth.keys]]\nname='a'\nkey='t'\n",
            "auth.keys: auth key name 'a' is used twice",
        ),
        (
            "[[models]]\nid='m'\nsource='file:/x'\n[[models]]\nid='m'\nsource='file:/y'\n",
            "id 'm' is used twice",
        ),
        (
            "[[models]]\nid='m1'\nsource='file:/x'\n[[models]]\nid='m2'\nsource='file:/y'\naliases=['m1']\n",
            "models: model alias 'm1' is used by 'm1' and 'm2'",
        ),
        ("[[models]]\nid='m'\nsource='file:/x'\ndtype='float17'\n", "models[0].dtype"),
    ],
    ids=["neurons", "keys", "model-ids", "alias", "dtype"],
)
def test_a_name_used_twice_or_a_wrong_dtype_is_refused_by_name(
    tmp_path: Path, toml: str, message: str
) -> None:
    """A later entry of the same name used to replace the earlier one silently."""
    path = tmp_path / "cortex.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_config(path, GatewayConfig)


def test_a_later_catalogue_takes_the_aliases_it_names() -> None:
    default = ModelSpec(id="small", source="file:/a", aliases=["smollm2"])
    mine = ModelSpec(id="mine", source="file:/b", aliases=["smollm2"])
    merged = merge_catalogues([default], [mine])
    assert resolve_alias(merged, "smollm2") == mine and merged[0].aliases == []
