"""KV storage: rows of sequences, each row with its own length.

Each layer's keys and values live in one buffer [2, rows, kv_heads, capacity, head_dim] on that
layer's device (a model split over several GPUs keeps each layer's KV beside its weights).
A decode forward writes one token per row at that row's own position and reads the rows in place;
a prefill forward writes a run of tokens into a row. Rows are moved, not re-packed, when sequences
leave, and the buffers grow by doubling. The engine keeps rows of similar length together (one
cache per length band) and each prompt being prefilled in a cache of its own, so no row is padded
to a much longer one; kv_bands.py binds them to a forward.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

_GROW_ALIGN = 64  # capacity grows in multiples of this many tokens

RowKV = list[torch.Tensor]  # one sequence's KV, per layer [2, kv_heads, length, head_dim]
TokenSlots = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class BatchKVCache:
    """Rows of KV, each an independent sequence with its own length (kv_bands.py binds them to
    a forward)."""

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
        self.devices, self.kv_heads, self.head_dim = devices, kv_heads, head_dim
        self.max_rows, self.max_length, self.dtype = max_rows, max_length, dtype
        self._buffers: list[torch.Tensor] = []

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

    def token_slots(self, rows: slice, positions: torch.Tensor) -> TokenSlots:
        """Where write_tokens puts one new token per row (row rows.start + i at positions[i]),
        computed once for a step's layers: indices of [keys or values, row, head, position]."""
        device, n = positions.device, rows.stop - rows.start
        return (
            torch.arange(2, device=device).view(1, 1, 2),
            torch.arange(rows.start, rows.stop, device=device).view(n, 1, 1),
            torch.arange(self.kv_heads, device=device).view(1, -1, 1),
            positions.view(n, 1, 1),
        )

    def write_tokens(
        self, layer: int, slots: TokenSlots, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """One new token per row, keys and values [rows, kv_heads, 1, head_dim], into the slots
        token_slots gave (each row at its own length)."""
        buffer = self._buffers[layer]
        if slots[0].device != buffer.device:  # a model split over devices keeps KV by its layer
            slots = tuple(s.to(buffer.device) for s in slots)  # type: ignore[assignment]
        buffer.index_put_(slots, torch.cat((keys, values), dim=2))

    def write_span(
        self, layer: int, row: int, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """A run of tokens [kv_heads, n, head_dim] into one row from position `start`."""
        buffer = self._buffers[layer]
        end = start + keys.shape[1]
        buffer[0, row, :, start:end] = keys
        buffer[1, row, :, start:end] = values

    def view(self, layer: int, rows: slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' first `length` keys and values in place [rows, kv_heads, length, head_dim]."""
        keys, values = self._buffers[layer][:, rows, :, :length].unbind()
        return keys, values


def _layer_devices(model: PreTrainedModel, count: int, default: torch.device) -> list[torch.device]:
    """Where each decoder layer's weights are, so its KV sits beside them."""
    try:
        layers = model.get_decoder().layers
    except AttributeError:
        return [default] * count
    if len(layers) != count:
        return [default] * count
    return [next(layer.parameters()).device for layer in layers]
