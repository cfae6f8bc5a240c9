"""Running the model over the batch's KV cache: one decode forward, or one packed prefill.

The tensor side of the engine: it builds input ids, positions and the 4D attention mask, binds
the cache and calls the model; the engine decides which sequences go in and what comes out.
Needs an attention implementation that honours a 4D mask (sdpa or eager, not flash-attention);
sliding-window models get the window in that mask (one mask per layer type where they mix).
"""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from cortex.neuron import cpu_linear
from cortex.neuron.kv_cache import BatchKVCache

_MASKED_ATTENTION = {"sdpa", "eager"}


class ModelRunner:
    """One model and its KV: the decoding batch's rows, and the rows of prompts being prefilled."""

    def __init__(
        self, model: PreTrainedModel, *, device: torch.device, max_rows: int, max_length: int
    ) -> None:
        attention = getattr(model.config, "_attn_implementation", "eager")
        if attention not in _MASKED_ATTENTION:
            raise ValueError(f"engine needs sdpa or eager attention, model uses {attention!r}")
        self._model, self._device = model, device
        if device.type == "cpu":
            cpu_linear.install(model)
        self.batch = BatchKVCache.for_model(
            model, max_rows=max_rows, max_length=max_length, device=device
        )
        # Prompts prefill apart, in any row, so a long one never blocks the batch's rows.
        self.staging = BatchKVCache.for_model(
            model, max_rows=max_rows, max_length=max_length, device=device
        )
        self._window, self._mixed_layers = _sliding_window(model.config.get_text_config())
        # transformers 5 renamed the forward's `past_key_values` to `cache`.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def decode(self, tokens: list[int], starts: list[int], first_row: int = 0) -> torch.Tensor:
        """Row first_row + i feeds tokens[i] at position starts[i]; logits [rows, vocab]."""
        ids = self._longs(tokens).unsqueeze(1)
        positions = self._longs(starts).unsqueeze(1)
        kv_length = max(starts) + 1
        rows = slice(first_row, first_row + len(tokens))
        self.batch.reserve(rows.stop, kv_length)
        self.batch.bind_rows(rows, positions, kv_length)
        mask = None  # rows of one length see every key: no mask, and sdpa takes a faster path
        if min(starts) != max(starts) or (self._window is not None and kv_length > self._window):
            # Each row sees its own tokens only, not the stale tail beyond a shorter row's length.
            distance = positions.unsqueeze(-1) - torch.arange(kv_length, device=self._device)
            mask = self._attention_mask(distance >= 0, distance)
        return self._run(self.batch, ids, positions, mask, logits_to_keep=1)[:, -1, :]

    def prefill(self, chunks: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """Chunks (staging row, start, tokens) packed into one forward row, unpadded.

        Returns the logits [chunks, vocab] of each chunk's last token.
        """
        history: list[tuple[int, int]] = []
        q_seq: list[int] = []  # which chunk each new token belongs to
        q_row: list[int] = []
        q_pos: list[int] = []
        k_seq: list[int] = []  # the same for each key attention reads: histories, then new tokens
        k_pos: list[int] = []
        for i, (row, start, chunk) in enumerate(chunks):
            q_seq += [i] * len(chunk)
            q_row += [row] * len(chunk)
            q_pos += range(start, start + len(chunk))
            if start:
                history.append((row, start))
                k_seq += [i] * start
                k_pos += range(start)
        queries, query_positions = self._longs(q_seq), self._longs(q_pos)
        keys, key_positions = self._longs(k_seq + q_seq), self._longs(k_pos + q_pos)
        self.staging.reserve(max(q_row) + 1, max(s + len(c) for _, s, c in chunks))
        self.staging.bind_packed(
            self._longs(q_row).unsqueeze(0), query_positions.unsqueeze(0), history
        )
        # A token sees its own sequence's earlier tokens: kept history and this chunk, causally.
        distance = (query_positions[:, None] - key_positions).unsqueeze(0)
        visible = (keys == queries[:, None]).unsqueeze(0) & (distance >= 0)
        ids = self._longs([t for _, _, chunk in chunks for t in chunk]).unsqueeze(0)
        ends = self._longs([len(c) for _, _, c in chunks]).cumsum(0) - 1
        positions = query_positions.unsqueeze(0)
        mask = self._attention_mask(visible, distance)
        return self._run(self.staging, ids, positions, mask, ends)[0]

    def promote(self, staging_row: int, batch_row: int, length: int) -> None:
        """A prefilled prompt joins the decoding batch."""
        self.batch.copy_row_from(self.staging, staging_row, batch_row, length)

    @property
    def kv_bytes(self) -> int:
        return self.batch.allocated_bytes + self.staging.allocated_bytes

    def _longs(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self._device)

    def _run(
        self,
        cache: BatchKVCache,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | dict[str, torch.Tensor] | None,
        logits_to_keep: int | torch.Tensor,
    ) -> torch.Tensor:
        """The model forward over a bound cache."""
        out = self._model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self._cache_arg: cache},
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
