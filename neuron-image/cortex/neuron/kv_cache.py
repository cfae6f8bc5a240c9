"""The running batch's KV cache: one row per sequence, each row with its own length.

Each layer's keys and values live in one buffer [2, rows, kv_heads, capacity, head_dim] on that
layer's device (a model split over several GPUs keeps each layer's KV beside its weights).
A decode forward is bound to a contiguous range of rows, each new token written at its row's own
position, so rows of different lengths share one batched forward and attention reads them in place
(the engine masks what a row must not see). A prefill forward packs several prompts into one row
with no padding; their tokens are scattered to their own rows. Rows are moved, not re-packed, when
sequences leave, and the buffers grow by doubling.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

_GROW_ALIGN = 64  # capacity grows in multiples of this many tokens

RowKV = list[torch.Tensor]  # one sequence's KV, per layer [2, kv_heads, length, head_dim]


class BatchKVCache(Cache):
    """A transformers Cache whose rows are independent sequences of different lengths."""

    def __init__(
        self,
        *,
        devices: list[torch.device],
        kv_heads: int,
        head_dim: int,
        max_rows: int,
        max_length: int,
        dtype: torch.dtype,
    ) -> None:
        # The parent only holds per-layer objects; this cache keeps its own buffers instead.
        super().__init__(layers=[])
        self.devices, self.kv_heads, self.head_dim = devices, kv_heads, head_dim
        self.max_rows, self.max_length, self.dtype = max_rows, max_length, dtype
        self._buffers: list[torch.Tensor] = []
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
        return cls(
            devices=_layer_devices(model, config.num_hidden_layers, device),
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            max_rows=max_rows,
            max_length=max_length,
            dtype=model.dtype,
        )

    @property
    def bytes_per_token(self) -> int:
        """KV memory one token of one sequence takes (keys + values, all layers)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * len(self.devices) * self.kv_heads * self.head_dim * element

    @property
    def allocated_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers)

    @property
    def rows(self) -> int:
        return self._buffers[0].shape[1] if self._buffers else 0

    @property
    def capacity(self) -> int:
        return self._buffers[0].shape[3] if self._buffers else 0

    def reserve(self, rows: int, length: int) -> None:
        """Make room for `rows` rows of `length` tokens, doubling whichever of the two is short.

        Growing one never grows the other: a batch filling up row by row keeps its length.
        """
        if rows <= self.rows and length <= self.capacity:
            return
        new_rows = self.rows
        if rows > self.rows:
            new_rows = max(rows, min(self.max_rows, 2 * self.rows))
        new_length = self.capacity
        if length > self.capacity:
            aligned = -(-max(length, 2 * self.capacity, _GROW_ALIGN) // _GROW_ALIGN) * _GROW_ALIGN
            new_length = max(length, min(self.max_length, aligned))
        self._resize(new_rows, new_length, keep=self.rows)

    def shrink(self, rows: int, length: int) -> None:
        """Give memory back: all of it when no row is live, else the unused three quarters."""
        if rows == 0:
            self._buffers = []
        elif 4 * length < self.capacity:
            self._resize(self.rows, max(_GROW_ALIGN, 2 * length), keep=rows)

    def _resize(self, rows: int, length: int, keep: int) -> None:
        resized = []
        for layer, device in enumerate(self.devices):
            shape = (2, rows, self.kv_heads, length, self.head_dim)
            buffer = torch.zeros(shape, dtype=self.dtype, device=device)
            if self._buffers:
                n = min(self.capacity, length)
                buffer[:, :keep, :, :n] = self._buffers[layer][:, :keep, :, :n]
            resized.append(buffer)
        self._buffers = resized

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy a row's first `length` tokens to another row (a sequence changing rows)."""
        for buffer in self._buffers:
            buffer[:, target, :, :length] = buffer[:, source, :, :length]

    def copy_row_from(self, other: BatchKVCache, source: int, target: int, length: int) -> None:
        """Copy another cache's row into one of ours (a prefilled prompt joining the batch)."""
        self.reserve(target + 1, length)
        for mine, theirs in zip(self._buffers, other._buffers, strict=True):
            mine[:, target, :, :length] = theirs[:, source, :, :length]

    def read_row(self, row: int, length: int) -> RowKV:
        """A copy of a row's first `length` tokens."""
        return [buffer[:, row, :, :length].clone() for buffer in self._buffers]

    def write_row(self, row: int, kv: RowKV, length: int) -> None:
        """Put the first `length` tokens of KV saved by read_row at the start of a row."""
        for buffer, saved in zip(self._buffers, kv, strict=True):
            buffer[:, row, :, :length] = saved[:, :, :length]

    def bind_rows(self, rows: slice, positions: torch.Tensor, kv_length: int) -> None:
        """Aim the next forward at a batch of rows; positions [rows, q]: where each new token goes.

        Attention reads the rows' first kv_length tokens in place (a view, no copy).
        """
        assert rows.stop <= self.rows and kv_length <= self.capacity
        index = torch.arange(rows.start, rows.stop, device=positions.device).unsqueeze(1)
        self._write = (index, positions)
        self._read_rows, self._history, self._kv_length = rows, [], kv_length

    def bind_packed(
        self, rows: torch.Tensor, positions: torch.Tensor, history: list[tuple[int, int]]
    ) -> None:
        """Aim the next forward at one packed row of several sequences' tokens.

        rows/positions [1, q] say where each token goes; attention reads the (row, length)
        histories, then the new tokens, in that order (the caller's mask follows that layout).
        """
        assert self._buffers
        self._write = (rows, positions)
        self._read_rows, self._history = None, history
        self._kv_length = sum(length for _, length in history) + rows.shape[1]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by each attention layer: store the new keys/values, return what attention reads."""
        assert self._write is not None
        keys, values = self._buffers[layer_idx]
        rows, positions = (t.to(keys.device) for t in self._write)
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
        return len(self.devices)


def _layer_devices(model: PreTrainedModel, count: int, default: torch.device) -> list[torch.device]:
    """Where each decoder layer's weights are, so its KV sits beside them."""
    try:
        layers = model.get_decoder().layers
    except AttributeError:
        return [default] * count
    if len(layers) != count:
        return [default] * count
    return [next(layer.parameters()).device for layer in layers]
