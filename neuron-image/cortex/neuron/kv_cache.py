"""The running batch's KV cache: one row per sequence, each row with its own length.

Keys and values of every layer live in one buffer [layers, 2, rows, kv_heads, capacity, head_dim].
A decode forward is bound to a contiguous range of rows, each new token written at its row's own
position, so rows of different lengths share one batched forward and attention reads them in place
(the engine masks what a row must not see). A prefill forward packs several prompts into one row
with no padding; their tokens are scattered to their own rows. Rows are moved, not re-packed, when
sequences leave, and the buffer grows by doubling.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

_GROW_ALIGN = 64  # capacity grows in multiples of this many tokens


class BatchKVCache(Cache):
    """A transformers Cache whose rows are independent sequences of different lengths."""

    def __init__(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_dim: int,
        max_rows: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        # The parent only holds per-layer objects; this cache keeps its own buffer instead.
        super().__init__(layers=[])
        self.num_layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.max_rows, self.max_length = max_rows, max_length
        self.dtype, self.device = dtype, device
        self._buffer: torch.Tensor | None = None
        self._write: tuple[torch.Tensor, torch.Tensor] | None = None
        self._read_rows: slice | None = None
        self._history: list[tuple[int, int]] = []
        self._kv_length = 0

    @classmethod
    def for_model(
        cls, model: PreTrainedModel, *, max_rows: int, max_length: int, device: torch.device
    ) -> BatchKVCache:
        """Size the rows from the model's config (Llama-family attention: kv heads x head_dim)."""
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(
            layers=config.num_hidden_layers,
            kv_heads=kv_heads,
            head_dim=head_dim,
            max_rows=max_rows,
            max_length=max_length,
            dtype=model.dtype,
            device=device,
        )

    @property
    def bytes_per_token(self) -> int:
        """KV memory one token of one sequence takes (keys + values, all layers)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.kv_heads * self.head_dim * element

    @property
    def allocated_bytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel() * self._buffer.element_size()

    @property
    def capacity(self) -> int:
        return 0 if self._buffer is None else self._buffer.shape[4]

    def reserve(self, rows: int, length: int) -> None:
        """Make room for `rows` rows of `length` tokens, growing the buffer (doubling) if needed."""
        have_rows = 0 if self._buffer is None else self._buffer.shape[2]
        if rows <= have_rows and length <= self.capacity:
            return
        new_rows = min(self.max_rows, max(rows, 2 * have_rows))
        new_length = min(self.max_length, max(length, 2 * self.capacity, _GROW_ALIGN))
        new_length = min(self.max_length, -(-new_length // _GROW_ALIGN) * _GROW_ALIGN)
        self._resize(max(new_rows, rows), max(new_length, length))

    def shrink(self, rows: int, length: int) -> None:
        """Give memory back when the live rows use under a quarter of the buffer's length."""
        if self._buffer is None:
            return
        if rows == 0:
            self._buffer = None
        elif 4 * length < self.capacity:
            self._resize(self._buffer.shape[2], max(_GROW_ALIGN, 2 * length), keep=rows)

    def _resize(self, rows: int, length: int, keep: int | None = None) -> None:
        shape = (self.num_layers, 2, rows, self.kv_heads, length, self.head_dim)
        grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self._buffer is not None:
            old = self._buffer
            r = min(old.shape[2], rows) if keep is None else keep
            n = min(old.shape[4], length)
            grown[:, :, :r, :, :n] = old[:, :, :r, :, :n]
        self._buffer = grown

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy a row's first `length` tokens to another row (a sequence changing rows)."""
        assert self._buffer is not None
        self._buffer[:, :, target, :, :length] = self._buffer[:, :, source, :, :length]

    def read_row(self, row: int, length: int) -> torch.Tensor:
        """A copy of a row's first `length` tokens: [layers, 2, kv_heads, length, head_dim]."""
        assert self._buffer is not None
        return self._buffer[:, :, row, :, :length].clone()

    def write_row(self, row: int, kv: torch.Tensor) -> None:
        """Put KV saved by read_row at the start of a row."""
        assert self._buffer is not None
        self._buffer[:, :, row, :, : kv.shape[3]] = kv

    def bind_rows(self, rows: slice, positions: torch.Tensor, kv_length: int) -> None:
        """Aim the next forward at a batch of rows; positions [rows, q]: where each new token goes.

        Attention reads the rows' first kv_length tokens in place (a view, no copy).
        """
        assert self._buffer is not None and rows.stop <= self._buffer.shape[2]
        index = torch.arange(rows.start, rows.stop, device=self.device).unsqueeze(1)
        self._write = (index, positions)
        self._read_rows, self._history, self._kv_length = rows, [], kv_length

    def bind_packed(
        self, rows: torch.Tensor, positions: torch.Tensor, history: list[tuple[int, int]]
    ) -> None:
        """Aim the next forward at one packed row of several sequences' tokens.

        rows/positions [1, q] say where each token goes; attention reads the (row, length)
        histories, then the new tokens, in that order (the caller's mask follows that layout).
        """
        assert self._buffer is not None
        self._write = (rows, positions)
        self._read_rows, self._history = None, history
        self._kv_length = sum(length for _, length in history) + rows.shape[1]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by each attention layer: store the new keys/values, return what attention reads."""
        assert self._buffer is not None and self._write is not None
        keys, values = self._buffer[layer_idx, 0], self._buffer[layer_idx, 1]
        rows, positions = self._write
        # Advanced indices (row, position) around the head slice come first: [n, q, heads, dim].
        keys[rows, :, positions] = key_states.transpose(1, 2)
        values[rows, :, positions] = value_states.transpose(1, 2)
        if self._read_rows is not None:
            read = self._read_rows
            return keys[read, :, : self._kv_length], values[read, :, : self._kv_length]
        if not self._history:
            return key_states, value_states
        # Key order is free: RoPE is already in the keys, and the mask names what each query sees.
        past_keys = [keys[row, :, :length] for row, length in self._history]
        past_values = [values[row, :, :length] for row, length in self._history]
        return (
            torch.cat([*past_keys, key_states[0]], dim=1).unsqueeze(0),
            torch.cat([*past_values, value_states[0]], dim=1).unsqueeze(0),
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._kv_length, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_length

    def __len__(self) -> int:
        return self.num_layers
