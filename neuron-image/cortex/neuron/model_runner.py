"""Running the model over its KV: one decode forward over the length bands, or one packed prefill.

The tensor side of the engine: it builds input ids, positions and the 4D attention masks, binds
the caches and calls the model; the engine decides which sequences go in and what comes out.
Needs an attention implementation that honours a 4D mask (sdpa or eager, not flash-attention);
sliding-window models get the window in that mask (one mask per layer type where they mix).
"""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache

from cortex.neuron import cpu_linear
from cortex.neuron.kv_bands import (
    BANDED_ATTENTION,
    BandRows,
    DecodeBands,
    PackedPrefill,
    band_limit,
    band_of,
)
from cortex.neuron.kv_cache import BatchKVCache
from cortex.neuron.llama_decode import LlamaDecode, unsupported

_MASKED_ATTENTION = {"sdpa", "eager", BANDED_ATTENTION}


class ModelRunner:
    """One model and its KV: decoding rows in length bands, prompts being prefilled apart."""

    def __init__(
        self, model: PreTrainedModel, *, device: torch.device, max_rows: int, max_length: int
    ) -> None:
        attention = getattr(model.config, "_attn_implementation", "eager")
        if attention not in _MASKED_ATTENTION:
            raise ValueError(f"engine needs sdpa or eager attention, model uses {attention!r}")
        self._model, self._device = model, device
        self._max_rows, self._max_length = max_rows, max_length
        self._layers = model.config.get_text_config().num_hidden_layers
        if device.type == "cpu":
            cpu_linear.install(model)
        self._window, self._mixed_layers = _sliding_window(model.config.get_text_config())
        # Bands need one attention call per band: sdpa models without a window get them; the
        # others keep every row in band 0 (one cache, rows padded to the longest).
        self.banded = attention in {"sdpa", BANDED_ATTENTION} and self._window is None
        if self.banded and attention != BANDED_ATTENTION:
            model.set_attn_implementation(BANDED_ATTENTION)
        self.bands: dict[int, BatchKVCache] = {}  # decoding rows, by length band
        # Each prompt prefills in a cache of its own, so a long one pads no other.
        self.staging: dict[int, BatchKVCache] = {}
        # Decode steps of a plain Llama skip transformers' per-layer plumbing (same arithmetic);
        # None: the HF forward (every other model; a bench sets it to compare the two).
        self.lean: LlamaDecode | None = None if unsupported(model) else LlamaDecode(model)
        # transformers 5 renamed the forward's `past_key_values` to `cache`.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def band_of(self, length: int) -> int:
        """The band a decoding row of `length` tokens belongs in."""
        return band_of(length) if self.banded else 0

    def band(self, band: int) -> BatchKVCache:
        if band not in self.bands:
            limit = min(band_limit(band), self._max_length) if self.banded else self._max_length
            self.bands[band] = self._cache(self._max_rows, limit)
        return self.bands[band]

    def stage(self, row: int) -> BatchKVCache:
        """The staging cache of a prompt being prefilled (one row)."""
        if row not in self.staging:
            self.staging[row] = self._cache(1, self._max_length)
        return self.staging[row]

    def unstage(self, row: int) -> None:
        self.staging.pop(row, None)

    def clear(self) -> None:
        self.bands.clear()
        self.staging.clear()

    def decode(self, segments: list[tuple[int, int, list[int], list[int]]]) -> torch.Tensor:
        """Segments (band, first row, tokens, starts): row first + i of the band feeds tokens[i]
        at position starts[i]. One forward; logits [rows, vocab] in segment order."""
        bands = [self._band_rows(*segment) for segment in segments]
        ids = self._longs([t for _, _, tokens, _ in segments for t in tokens]).unsqueeze(1)
        positions = torch.cat([b.positions for b in bands]).unsqueeze(1)
        binding = DecodeBands(bands, self._layers)
        if self.lean is not None and not self.lean.overridden():
            return self.lean(binding, ids, positions)
        if len(bands) == 1:  # the model's own attention, with this band's mask
            return self._run(binding, ids, positions, bands[0].mask, logits_to_keep=1)[:, -1, :]
        logits = self._run(binding, ids, positions, None, logits_to_keep=1, row_bands=binding)
        return logits[:, -1, :]

    def _band_rows(self, band: int, first: int, tokens: list[int], starts: list[int]) -> BandRows:
        cache = self.band(band)
        kv_length = max(starts) + 1
        rows = slice(first, first + len(tokens))
        cache.reserve(rows.stop, kv_length)
        positions = self._longs(starts)
        mask = None  # rows of one length see every key: no mask, and sdpa takes a faster path
        if min(starts) != max(starts) or (self._window is not None and kv_length > self._window):
            # Each row sees its own tokens only, not the stale tail beyond a shorter row's length.
            distance = positions[:, None, None] - torch.arange(kv_length, device=self._device)
            mask = self._attention_mask(distance >= 0, distance)
        return BandRows(cache, rows, positions, kv_length, mask)

    def prefill(self, chunks: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """Chunks (staging row, start, tokens) packed into one forward row, unpadded.

        Returns the logits [chunks, vocab] of each chunk's last token.
        """
        q_seq: list[int] = []  # which chunk each new token belongs to
        q_pos: list[int] = []
        k_seq: list[int] = []  # the same for each key attention reads: histories, then new tokens
        k_pos: list[int] = []
        for i, (row, start, chunk) in enumerate(chunks):
            q_seq += [i] * len(chunk)
            q_pos += range(start, start + len(chunk))
            self.stage(row).reserve(1, start + len(chunk))
            if start:
                k_seq += [i] * start
                k_pos += range(start)
        queries, query_positions = self._longs(q_seq), self._longs(q_pos)
        keys, key_positions = self._longs(k_seq + q_seq), self._longs(k_pos + q_pos)
        binding = PackedPrefill(
            [(self.stage(row), start, len(chunk)) for row, start, chunk in chunks], self._layers
        )
        # A token sees its own sequence's earlier tokens: kept history and this chunk, causally.
        distance = (query_positions[:, None] - key_positions).unsqueeze(0)
        visible = (keys == queries[:, None]).unsqueeze(0) & (distance >= 0)
        ids = self._longs([t for _, _, chunk in chunks for t in chunk]).unsqueeze(0)
        ends = self._longs([len(c) for _, _, c in chunks]).cumsum(0) - 1
        positions = query_positions.unsqueeze(0)
        mask = self._attention_mask(visible, distance)
        return self._run(binding, ids, positions, mask, ends)[0]

    def promote(self, staging_row: int, band: int, row: int, length: int) -> None:
        """A prefilled prompt joins a band of the decoding batch; its staging cache goes."""
        self.band(band).copy_row_from(self.stage(staging_row), 0, row, length)
        self.unstage(staging_row)

    def move(self, source: tuple[int, int], target: tuple[int, int], length: int) -> None:
        """A decoding row changes (band, row): it left its band, or its band's last row fills
        a leaver's place."""
        if source[0] == target[0]:
            self.band(source[0]).move_row(source[1], target[1], length)
        else:
            self.band(target[0]).copy_row_from(self.band(source[0]), source[1], target[1], length)

    @property
    def kv_bytes_per_token(self) -> int:
        return self._cache(1, 1).bytes_per_token  # allocates nothing until rows are reserved

    @property
    def kv_bytes(self) -> int:
        caches = [*self.bands.values(), *self.staging.values()]
        return sum(c.allocated_bytes for c in caches)

    def _cache(self, rows: int, length: int) -> BatchKVCache:
        return BatchKVCache.for_model(
            self._model, max_rows=rows, max_length=length, device=self._device
        )

    def _longs(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self._device)

    def _run(
        self,
        cache: Cache,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | dict[str, torch.Tensor] | None,
        logits_to_keep: int | torch.Tensor,
        **attention: object,
    ) -> torch.Tensor:
        """The model forward over a bound cache; `attention` goes to the attention function."""
        out = self._model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self._cache_arg: cache},
            **attention,
        )
        return out.logits

    def _attention_mask(
        self, visible: torch.Tensor, distance: torch.Tensor
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Additive 4D mask(s): sliding-window layers also drop keys older than the window."""
        full = self._additive(visible)
        if self._window is None:
            return full
        windowed = self._additive(visible & (distance < self._window))
        if self._mixed_layers:  # such models take one mask per layer type
            return {"full_attention": full, "sliding_attention": windowed}
        return windowed

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        dtype = self._model.dtype
        mask = torch.zeros(visible.shape, dtype=dtype, device=self._device)
        return mask.masked_fill(~visible, torch.finfo(dtype).min).unsqueeze(1)


def _sliding_window(config: PreTrainedConfig) -> tuple[int | None, bool]:
    """The model's attention window, if any, and whether only some layers use it."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None, False
    types = getattr(config, "layer_types", None) or []
    if types and "sliding_attention" not in types:
        return None, False
    return int(window), "full_attention" in types
