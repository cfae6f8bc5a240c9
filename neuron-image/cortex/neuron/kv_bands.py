"""Length bands: decoding rows of similar length share a KV cache, and attention runs per band.

A batch's rows used to share one cache padded to the longest row, so 16 short streams beside a
6,000-token one each attended over 6,000 positions (mostly masked) and held as much memory.
Here a row of length L sits in band 0 below BAND_BASE tokens, else in band k where
BAND_BASE * 2^(k-1) <= L < BAND_BASE * 2^k, so a band pads its rows by at most 2x (band 0: by
BAND_BASE). One decode forward still runs every row through the linear layers together (their
weights are read once per step, which is the cost that batching amortizes); only attention is
split: one scaled-dot-product call per band, each over that band's own length. Choice and
measurements: docs/benchmarks.md ("P2, mixed workloads").

The bindings below are the transformers `Cache` a forward writes to: DecodeBands for a decode
step over bands of rows, PackedPrefill for prompt chunks packed into one unpadded row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from cortex.neuron.kv_cache import BatchKVCache

BAND_BASE = 256
BANDED_ATTENTION = "cortex_bands"  # sdpa, plus one call per band when a forward has several


def band_of(length: int) -> int:
    """The band of a row holding `length` tokens: 0 below BAND_BASE, then one per doubling."""
    return 0 if length < BAND_BASE else (length // BAND_BASE).bit_length()


def band_limit(band: int) -> int:
    """The first length that no longer belongs in `band`."""
    return BAND_BASE << band


@dataclass
class BandRows:
    """Contiguous rows of one band in a decode step: row rows.start + i feeds a token at
    positions[i]; mask (additive, or None when every row may see all kv_length keys)."""

    cache: BatchKVCache
    rows: slice
    positions: torch.Tensor
    kv_length: int
    mask: torch.Tensor | None

    @property
    def count(self) -> int:
        return self.rows.stop - self.rows.start


class _Binding(Cache):
    """What a transformers model needs of a cache beyond update(): lengths for its masks."""

    def __init__(self, layers: int, kv_length: int) -> None:
        super().__init__(layers=[])  # the parent only holds per-layer objects; unused here
        self._layers, self._kv_length = layers, kv_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._kv_length, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self._kv_length

    def __len__(self) -> int:
        return self._layers


class DecodeBands(_Binding):
    """A decode step over one or more bands; the batch's rows are the bands' rows in order."""

    def __init__(self, bands: list[BandRows], layers: int) -> None:
        super().__init__(layers, max(b.kv_length for b in bands))
        self.bands = bands
        self._slots = [b.cache.token_slots(b.rows, b.positions) for b in bands]  # for all layers
        self._views: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's new token in its band; return what a lone band's attention reads."""
        self._views, offset = [], 0
        for band, slots in zip(self.bands, self._slots, strict=True):
            new = slice(offset, offset + band.count)
            if len(self.bands) > 1:
                keys, values = key_states[new], value_states[new]
            else:
                keys, values = key_states, value_states
            band.cache.write_tokens(layer_idx, slots, keys, values)
            self._views.append(band.cache.view(layer_idx, band.rows, band.kv_length))
            offset = new.stop
        return self._views[0]  # with several bands, attend() reads them all instead

    def attend(self, module: torch.nn.Module, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of each band's queries over its own keys: [rows, 1, heads, head_dim]."""
        outputs, offset = [], 0
        for band, (keys, values) in zip(self.bands, self._views, strict=True):
            rows = slice(offset, offset + band.count)
            out, _ = decode_sdpa(module, query[rows], keys, values, band.mask, scaling=scaling)
            outputs.append(out)
            offset = rows.stop
        return torch.cat(outputs)


class PackedPrefill(_Binding):
    """Prompt chunks packed into one row; each prompt's KV kept in its own staging cache.

    chunks: (cache, start, tokens) per prompt, in packing order. Attention reads the histories
    (tokens before `start` of each chunk that has one), then all new tokens, in that order (the
    caller's mask follows that layout).
    """

    def __init__(self, chunks: list[tuple[BatchKVCache, int, int]], layers: int) -> None:
        super().__init__(layers, sum(start + n for _, start, n in chunks))
        self.chunks = chunks

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        past_keys, past_values, offset = [], [], 0
        for cache, start, n in self.chunks:
            new = slice(offset, offset + n)
            cache.write_span(layer_idx, 0, start, key_states[0, :, new], value_states[0, :, new])
            if start:
                keys, values = cache.view(layer_idx, slice(0, 1), start)
                past_keys.append(keys[0])
                past_values.append(values[0])
            offset = new.stop
        if not past_keys:
            return key_states, value_states
        # Key order is free: RoPE is already in the keys, and the mask names what each query sees.
        return (
            torch.cat([*past_keys, key_states[0]], dim=1).unsqueeze(0),
            torch.cat([*past_values, value_states[0]], dim=1).unsqueeze(0),
        )


def decode_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa, except that a one-token query on CPU always runs on the KV heads.

    Without a mask transformers asks sdpa for `enable_gqa`, and torch's CPU kernel then reads each
    KV head once per query head of its group (3x for SmolLM2: 1.5-1.7x the attention time,
    docs/benchmarks.md "P2, mixed workloads"). With a mask it already packs the query heads
    [rows, heads, 1, dim] as [rows, kv_heads, groups, dim], which reads each KV head once; this
    does the same without one. GPU kernels take `enable_gqa` natively: they keep its path.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    rows, heads, q_length, dim = query.shape
    if query.device.type != "cpu" or q_length != 1 or groups == 1 or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    packed = query.reshape(rows, heads // groups, groups, dim)
    out = F.scaled_dot_product_attention(packed, key, value, scale=kwargs.get("scaling"))
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


def banded_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    row_bands: DecodeBands | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """sdpa, or with `row_bands` (a decode step over several bands) one sdpa per band."""
    if row_bands is None:
        return decode_sdpa(module, query, key, value, attention_mask, **kwargs)
    return row_bands.attend(module, query, kwargs["scaling"]), None


AttentionInterface.register(BANDED_ATTENTION, banded_attention)
AttentionMaskInterface.register(BANDED_ATTENTION, sdpa_mask)
