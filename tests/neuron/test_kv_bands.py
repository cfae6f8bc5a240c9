"""Decode attention on the KV heads: the packed query gives grouped-query attention's answer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cortex.neuron.kv_bands import decode_sdpa


def reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask) -> torch.Tensor:
    """Plain attention with each KV head repeated for its query heads: [rows, 1, heads, dim]."""
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    scores = query @ keys.transpose(-1, -2) / query.shape[-1] ** 0.5
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ values).transpose(1, 2)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (6, 2), (4, 4)])
def test_one_token_query_matches_grouped_attention(masked: bool, heads: int, kv_heads: int) -> None:
    torch.manual_seed(0)
    module = nn.Module()
    module.num_key_value_groups = heads // kv_heads
    query = torch.randn(4, heads, 1, 64)  # 4 rows, each query head reads KV head h // groups
    keys, values = torch.randn(4, kv_heads, 50, 64), torch.randn(4, kv_heads, 50, 64)
    mask = None
    if masked:  # rows of lengths 50, 40, 30, 20 in one band
        hidden = torch.arange(50) >= torch.tensor([50, 40, 30, 20])[:, None]
        mask = torch.zeros(4, 1, 1, 50).masked_fill(hidden[:, None, None], torch.finfo().min)
    out, _ = decode_sdpa(module, query, keys, values, mask, scaling=64**-0.5)
    assert out.shape == (4, 1, heads, 64)
    torch.testing.assert_close(out, reference(query, keys, values, mask), rtol=1e-5, atol=1e-5)


def test_other_devices_keep_transformers_path() -> None:
    module = nn.Module()
    module.num_key_value_groups = 3
    query = torch.empty(2, 9, 1, 64, device="meta")
    keys = values = torch.empty(2, 3, 10, 64, device="meta")
    out, _ = decode_sdpa(module, query, keys, values, None, scaling=0.125)
    assert out.shape == (2, 1, 9, 64)
