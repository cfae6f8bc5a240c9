"""The weight-left linear kernel: same results as F.linear, installed only where it was faster."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama_config
from torch import nn
from transformers import LlamaForCausalLM

from cortex.neuron import cpu_linear


class QuantizedLinear(nn.Linear):
    """Stands in for a quantized subclass (bitsandbytes' Linear4bit is one): never rerouted."""


@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_weight_left_equals_linear(rows: int) -> None:
    weight, x = torch.randn(48, 24), torch.randn(rows, 24)
    assert torch.allclose(cpu_linear.weight_left(x, weight), x @ weight.T, atol=1e-5)
    assert cpu_linear.weight_left(x, weight).is_contiguous()


def test_installed_layers_keep_their_outputs_and_fall_back_beyond_the_limit(monkeypatch) -> None:
    monkeypatch.setattr(cpu_linear, "_race", lambda plain, left: (2.0, 1.0))  # left always wins
    layers = nn.Sequential(nn.Linear(24, 48), QuantizedLinear(48, 8, bias=False), nn.Linear(8, 8))
    layers[2]._hf_hook = object()  # an accelerate-hooked layer keeps its forward too
    x = torch.randn(2, 5, 24)  # 10 rows
    with torch.inference_mode():
        before = layers(x)
        assert cpu_linear.install(layers) == cpu_linear.ROW_BUCKETS[-1]
        assert "forward" in vars(layers[0])  # rerouted
        assert "forward" not in vars(layers[1])  # a subclass keeps its own forward
        assert "forward" not in vars(layers[2])
        assert torch.allclose(layers(x), before, atol=1e-5)
        wide = torch.randn(1, 100, 24)  # more rows than the limit: F.linear
        plain = nn.functional.linear(wide, layers[0].weight, layers[0].bias)
        plain = nn.functional.linear(
            nn.functional.linear(plain, layers[1].weight), layers[2].weight, layers[2].bias
        )
        assert torch.allclose(layers(wide), plain, atol=1e-5)
    assert layers(x).requires_grad  # training (grad on) takes F.linear


def test_a_model_is_measured_once(monkeypatch) -> None:
    races = []
    monkeypatch.setattr(cpu_linear, "_race", lambda plain, left: races.append(1) or (2.0, 1.0))
    layers = nn.Sequential(nn.Linear(8, 8))
    assert cpu_linear.install(layers) == cpu_linear.install(layers) == cpu_linear.ROW_BUCKETS[-1]
    assert len(races) == len(cpu_linear.ROW_BUCKETS)


def test_nothing_installed_where_linear_was_faster(monkeypatch) -> None:
    monkeypatch.setattr(cpu_linear, "_race", lambda plain, left: (1.0, 2.0))
    layers = nn.Sequential(nn.Linear(8, 8))
    assert cpu_linear.install(layers) is None
    assert "forward" not in vars(layers[0])


def test_limit_is_the_last_bucket_before_a_clear_loss(monkeypatch) -> None:
    outcomes = iter([(2.0, 1.0), (1.0, 1.04), (1.0, 1.5)])  # win, tie (noise), loss
    monkeypatch.setattr(cpu_linear, "_race", lambda plain, left: next(outcomes))
    assert cpu_linear.install(nn.Sequential(nn.Linear(8, 8))) == cpu_linear.ROW_BUCKETS[1]


def test_a_real_model_decodes_the_same_through_the_rerouted_layers(monkeypatch) -> None:
    monkeypatch.setattr(cpu_linear, "_race", lambda plain, left: (2.0, 1.0))
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=64)).eval()
    ids = torch.randint(0, 64, (3, 7))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        assert (
            cpu_linear.install(model) == cpu_linear.ROW_BUCKETS[-1]
        )  # 21 rows below: all rerouted
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-4)


def test_a_choice_is_remembered_per_shapes_and_threads(monkeypatch, tmp_path) -> None:
    races = []
    monkeypatch.setattr(cpu_linear, "_race", lambda plain, left: races.append(1) or (2.0, 1.0))
    memo = tmp_path / "kernels" / "cpu_linear.json"
    assert (
        cpu_linear.install(nn.Sequential(nn.Linear(8, 8)), memo=memo) == cpu_linear.ROW_BUCKETS[-1]
    )
    timed = len(races)
    # A new model of the same shapes (a fresh process loading it again) is not timed again ...
    again = nn.Sequential(nn.Linear(8, 8))
    assert (
        cpu_linear.install(again, memo=memo) == cpu_linear.ROW_BUCKETS[-1] and len(races) == timed
    )
    assert "forward" in vars(again[0])  # ... and is still rerouted
    # ... but other shapes, or other torch threads, are.
    cpu_linear.install(nn.Sequential(nn.Linear(8, 16)), memo=memo)
    assert len(races) == 2 * timed
    monkeypatch.setattr(torch, "get_num_threads", lambda: 977)
    cpu_linear.install(nn.Sequential(nn.Linear(8, 8)), memo=memo)
    assert len(races) == 3 * timed


def test_a_remembered_loss_keeps_f_linear_and_a_broken_memo_is_retimed(
    monkeypatch, tmp_path
) -> None:
    monkeypatch.setattr(cpu_linear, "_race", lambda plain, left: (1.0, 2.0))
    memo = tmp_path / "cpu_linear.json"
    assert cpu_linear.install(nn.Sequential(nn.Linear(8, 8)), memo=memo) is None
    monkeypatch.setattr(cpu_linear, "_race", lambda plain, left: (2.0, 1.0))
    kept = nn.Sequential(nn.Linear(8, 8))
    assert cpu_linear.install(kept, memo=memo) is None  # remembered: no new timing
    assert "forward" not in vars(kept[0])
    memo.write_text("{not json")
    assert (
        cpu_linear.install(nn.Sequential(nn.Linear(8, 8)), memo=memo) == cpu_linear.ROW_BUCKETS[-1]
    )
