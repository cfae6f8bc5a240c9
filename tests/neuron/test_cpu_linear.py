"""The CPU linear kernels: same results as F.linear, each installed only where it was faster."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tiny_models import tiny_llama_config
from torch import nn
from transformers import LlamaForCausalLM

from cortex.neuron import cpu_linear

BUCKETS = len(cpu_linear.ROW_BUCKETS)
CAN_PACK = cpu_linear._can_pack(torch.float32)
PADDING_PAYS = cpu_linear._padding_pays


@pytest.fixture(autouse=True)
def padding_never_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether `left` pads its rows is its own race (the tests that name it put it back); the
    tests of the bucket choices leave it out."""
    monkeypatch.setattr(cpu_linear, "_padding_pays", lambda sample: False)


class QuantizedLinear(nn.Linear):
    """Stands in for a quantized subclass (bitsandbytes' Linear4bit is one): never rerouted."""


def timings(linear: float, left: float, packed: float = 9.0) -> Callable[..., list[float]]:
    """A stand-in for _race: fixed seconds for F.linear, weight_left and (if timed) packed."""
    return lambda *runs: [linear, left, packed][: len(runs)]


@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_weight_left_equals_linear(rows: int) -> None:
    weight, x = torch.randn(48, 24), torch.randn(rows, 24)
    assert torch.allclose(cpu_linear.weight_left(x, weight), x @ weight.T, atol=1e-5)
    assert cpu_linear.weight_left(x, weight).is_contiguous()


@pytest.mark.parametrize("rows", [2, 8, 9, 15, 17, 24, 31])
def test_weight_left_on_rows_padded_to_a_tile_equals_linear(rows: int) -> None:
    weight, x = torch.randn(48, 24), torch.randn(rows, 24)
    out = cpu_linear.weight_left(x, weight, cpu_linear.LEFT_TILE)
    assert out.shape == (rows, 48) and out.is_contiguous()
    assert torch.allclose(out, x @ weight.T, atol=1e-5)


@pytest.mark.parametrize(("padded", "form"), [(0.5, "left8"), (0.98, "left")])
def test_left_pads_its_rows_only_where_padding_is_clearly_faster(
    monkeypatch: pytest.MonkeyPatch, padded: float, form: str
) -> None:
    monkeypatch.setattr(cpu_linear, "_padding_pays", PADDING_PAYS)
    monkeypatch.setattr(cpu_linear, "_can_pack", lambda dtype: False)
    outcomes = iter([[2.0, 1.0]] * BUCKETS + [[1.0, padded]])  # the buckets, then padding
    monkeypatch.setattr(cpu_linear, "_race", lambda *runs: next(outcomes))
    layer = nn.Linear(8, 8)
    assert cpu_linear.install(nn.Sequential(layer)) == {(8, 8): (form,) * BUCKETS}
    tiles: list[int] = []
    real = cpu_linear.weight_left
    monkeypatch.setattr(
        cpu_linear, "weight_left", lambda x, w, tile=1: tiles.append(tile) or real(x, w, tile)
    )
    x = torch.randn(15, 8)
    with torch.inference_mode():
        assert torch.allclose(
            layer(x), nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5
        )
    assert tiles == [cpu_linear.LEFT_TILE if form == "left8" else 1]


@pytest.mark.skipif(not CAN_PACK, reason="this torch build has no MKL packed GEMM")
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_packed_equals_linear(rows: int) -> None:
    weight, x = torch.randn(48, 24), torch.randn(rows, 24)
    packed = cpu_linear.pack(weight)
    assert torch.allclose(cpu_linear.packed_linear(x, packed, weight), x @ weight.T, atol=1e-5)


def test_installed_layers_keep_their_outputs_and_fall_back_beyond_the_last_bucket(
    monkeypatch,
) -> None:
    monkeypatch.setattr(cpu_linear, "_race", timings(2.0, 1.0))  # weight_left always wins
    layers = nn.Sequential(nn.Linear(24, 48), QuantizedLinear(48, 8, bias=False), nn.Linear(8, 8))
    layers[2]._hf_hook = object()  # an accelerate-hooked layer keeps its forward too
    x = torch.randn(2, 5, 24)  # 10 rows
    with torch.inference_mode():
        before = layers(x)
        assert cpu_linear.install(layers) == {(48, 24): ("left",) * BUCKETS}
        assert "forward" in vars(layers[0])  # rerouted
        assert "forward" not in vars(layers[1])  # a subclass keeps its own forward
        assert "forward" not in vars(layers[2])
        assert torch.allclose(layers(x), before, atol=1e-5)
        wide = torch.randn(1, 100, 24)  # more rows than the last bucket: F.linear
        plain = nn.functional.linear(wide, layers[0].weight, layers[0].bias)
        plain = nn.functional.linear(
            nn.functional.linear(plain, layers[1].weight), layers[2].weight, layers[2].bias
        )
        assert torch.allclose(layers(wide), plain, atol=1e-5)
    assert layers(x).requires_grad  # training (grad on) takes F.linear
    assert cpu_linear.packed_bytes(layers) == 0


def test_a_model_is_measured_once_per_shape(monkeypatch) -> None:
    races = []
    monkeypatch.setattr(cpu_linear, "_race", lambda *runs: races.append(1) or [2.0, 1.0, 9.0])
    layers = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 16))
    assert cpu_linear.install(layers) == cpu_linear.install(layers)
    assert len(races) == 2 * BUCKETS  # two shapes


def test_nothing_installed_where_linear_was_faster(monkeypatch) -> None:
    monkeypatch.setattr(cpu_linear, "_race", timings(1.0, 2.0, 3.0))
    layers = nn.Sequential(nn.Linear(8, 8))
    assert cpu_linear.install(layers) == {(8, 8): ("linear",) * BUCKETS}
    assert "forward" not in vars(layers[0])


def test_each_bucket_takes_its_own_winner_and_a_tie_keeps_weight_left(monkeypatch) -> None:
    outcomes = iter([[1.0, 1.5, 9.0], [1.0, 1.04, 9.0], [2.0, 1.0, 9.0], [1.0, 1.5, 9.0]])
    monkeypatch.setattr(cpu_linear, "_race", lambda *runs: next(outcomes)[: len(runs)])
    layer = nn.Linear(8, 8)
    forms = cpu_linear.install(nn.Sequential(layer))[(8, 8)]
    assert forms == ("linear", "left", "left", "linear")  # loss, tie (noise), win, loss
    used = []
    real = cpu_linear.weight_left
    monkeypatch.setattr(cpu_linear, "weight_left", lambda x, w: used.append(len(x)) or real(x, w))
    with torch.inference_mode():
        for rows in (1, 2, 4, 5, 16, 17, 32):
            layer(torch.randn(rows, 8))
    assert used == [2, 4, 5, 16]  # buckets 4 (rows 2-4) and 16 (rows 5-16)


@pytest.mark.skipif(not CAN_PACK, reason="this torch build has no MKL packed GEMM")
def test_packed_weights_only_where_clearly_fastest(monkeypatch) -> None:
    outcomes = iter([[1.0, 2.0, 0.5], [1.0, 2.0, 0.98], [1.0, 0.8, 0.7], [1.0, 1.0, 0.5]])
    monkeypatch.setattr(cpu_linear, "_race", lambda *runs: next(outcomes))
    layers = nn.Sequential(nn.Linear(24, 48))
    xs = [torch.randn(rows, 24) for rows in (1, 3, 10, 20)]
    with torch.inference_mode():
        before = [layers(x) for x in xs]
        forms = cpu_linear.install(layers)
        # a 2% gain does not pay for a copy of the weight; weight_left at 0.8 vs packed at 0.7 does
        assert forms == {(48, 24): ("packed", "linear", "packed", "packed")}
        for x, expected in zip(xs, before, strict=True):
            assert torch.allclose(layers(x), expected, atol=1e-5)
    assert cpu_linear.packed_bytes(layers) == 48 * 24 * 4


@pytest.mark.skipif(not CAN_PACK, reason="this torch build has no MKL packed GEMM")
def test_packed_copies_are_made_only_while_they_fit_the_room(monkeypatch) -> None:
    monkeypatch.setattr(cpu_linear, "_race", lambda *runs: [1.0, 2.0, 0.5][: len(runs)])
    layers = nn.Sequential(nn.Linear(24, 48), nn.Linear(24, 48), nn.Linear(48, 24))
    shape_bytes = 2 * 48 * 24 * 4  # the two (48, 24) layers' copies
    with torch.inference_mode():
        forms = cpu_linear.install(layers, room=shape_bytes)
    # the first shape's copies fit exactly; nothing is left for the second, which keeps F.linear
    assert forms == {(48, 24): ("packed",) * BUCKETS, (24, 48): ("linear",) * BUCKETS}
    assert cpu_linear.packed_bytes(layers) == shape_bytes


def test_a_packed_product_that_differs_is_never_chosen(monkeypatch) -> None:
    monkeypatch.setattr(cpu_linear, "_can_pack", lambda dtype: True)
    monkeypatch.setattr(cpu_linear, "pack", lambda weight: weight)
    monkeypatch.setattr(
        cpu_linear, "packed_linear", lambda x, packed, weight: nn.functional.linear(x, weight) + 1
    )
    timed = []
    monkeypatch.setattr(cpu_linear, "_race", lambda *runs: timed.append(len(runs)) or [2.0, 1.0])
    assert cpu_linear.install(nn.Sequential(nn.Linear(8, 8))) == {(8, 8): ("left",) * BUCKETS}
    assert timed == [2] * BUCKETS  # F.linear and weight_left only


@pytest.mark.parametrize(
    "fastest",
    ["left", "left8", pytest.param("packed", marks=pytest.mark.skipif(not CAN_PACK, reason=""))],
)
def test_a_real_model_decodes_the_same_through_the_rerouted_layers(monkeypatch, fastest) -> None:
    monkeypatch.setattr(cpu_linear, "_padding_pays", lambda sample: fastest == "left8")
    monkeypatch.setattr(
        cpu_linear, "_race", timings(2.0, 1.0, 0.5) if fastest == "packed" else timings(2.0, 1.0)
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=64)).eval()
    ids = torch.randint(0, 64, (3, 7))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        chosen = cpu_linear.install(model)  # 21 rows below: all rerouted (left8: padded to 24)
        after = model(input_ids=ids).logits
    assert {form for forms in chosen.values() for form in forms} == {fastest}
    assert torch.allclose(before, after, atol=1e-4)


def test_a_choice_is_remembered_per_shape_and_threads(monkeypatch, tmp_path) -> None:
    races = []
    monkeypatch.setattr(cpu_linear, "_race", lambda *runs: races.append(1) or [2.0, 1.0, 9.0])
    memo = tmp_path / "kernels" / "cpu_linear.json"
    lefts = ("left",) * BUCKETS
    assert cpu_linear.install(nn.Sequential(nn.Linear(8, 8)), memo=memo) == {(8, 8): lefts}
    timed = len(races)
    # A new model of the same shapes (a fresh process loading it again) is not timed again ...
    again = nn.Sequential(nn.Linear(8, 8))
    assert cpu_linear.install(again, memo=memo) == {(8, 8): lefts} and len(races) == timed
    assert "forward" in vars(again[0])  # ... and is still rerouted
    # ... nor is a shape it shares with another model, but a new shape or other threads are.
    cpu_linear.install(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 16)), memo=memo)
    assert len(races) == 2 * timed
    monkeypatch.setattr(torch, "get_num_threads", lambda: 977)
    cpu_linear.install(nn.Sequential(nn.Linear(8, 8)), memo=memo)
    assert len(races) == 3 * timed


def test_a_remembered_loss_keeps_f_linear_and_a_broken_or_old_memo_is_retimed(
    monkeypatch, tmp_path
) -> None:
    monkeypatch.setattr(cpu_linear, "_race", timings(1.0, 2.0))
    memo = tmp_path / "cpu_linear.json"
    linears = {(8, 8): ("linear",) * BUCKETS}
    assert cpu_linear.install(nn.Sequential(nn.Linear(8, 8)), memo=memo) == linears
    monkeypatch.setattr(cpu_linear, "_race", timings(2.0, 1.0))
    kept = nn.Sequential(nn.Linear(8, 8))
    assert cpu_linear.install(kept, memo=memo) == linears  # remembered: no new timing
    assert "forward" not in vars(kept[0])
    lefts = {(8, 8): ("left",) * BUCKETS}
    memo.write_text("{not json")
    assert cpu_linear.install(nn.Sequential(nn.Linear(8, 8)), memo=memo) == lefts
    # The format before per-shape choices: one row limit per model, keyed otherwise.
    memo.write_text('{"e414037023cfc21bcb26f9b1": null, "c56a9ef5faeba3a5c54f1cc3": 32}')
    assert cpu_linear.install(nn.Sequential(nn.Linear(8, 8)), memo=memo) == lefts


def test_uninstall_gives_back_the_stock_layers(monkeypatch) -> None:
    monkeypatch.setattr(cpu_linear, "_race", timings(2.0, 1.0, 0.5 if CAN_PACK else 9.0))
    layers = nn.Sequential(nn.Linear(8, 8))
    cpu_linear.install(layers)
    assert "forward" in vars(layers[0])
    cpu_linear.uninstall(layers)
    assert "forward" not in vars(layers[0]) and cpu_linear.packed_bytes(layers) == 0
    monkeypatch.setattr(cpu_linear, "_race", timings(1.0, 2.0, 3.0))
    assert cpu_linear.install(layers) == {(8, 8): ("linear",) * BUCKETS}  # measured anew
