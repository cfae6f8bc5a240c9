"""A decode step of a Llama model on CPU without transformers' per-layer plumbing.

transformers runs each decoder layer through a dozen module calls, keyword plumbing, a cache
object and an attention-interface lookup, and rebuilds rotary and norm from small ops; on a
16-row SmolLM2-135M step that Python and dispatch is a large share of the time
(docs/benchmarks.md, "P2, the 16-stream decode step on CPU"). `LlamaDecode` runs one new token
per row through the same weights with the same arithmetic, so its logits equal the HF forward's
bit for bit (tests/neuron/test_llama_decode.py). `unsupported` names what a model has that this
does not reproduce; such a model keeps the HF forward.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
)

from cortex.neuron.kv_bands import BANDED_ATTENTION, DecodeBands

# Rope types whose cos/sin depend on the position alone (tested); "dynamic" and "longrope" rescale
# with the sequence length inside the rotary module's forward.
_ROPE_TYPES = {"default", "linear", "llama3"}


def unsupported(model: nn.Module) -> str | None:
    """Why `model` must keep the HF forward for decoding, or None when LlamaDecode equals it."""
    if type(model) is not LlamaForCausalLM:
        return f"{type(model).__name__} is not LlamaForCausalLM"
    config = model.config
    rope = _rope_type(config)
    checks = {
        "training mode": model.training,
        f"attention {config._attn_implementation!r}": config._attn_implementation
        != BANDED_ATTENTION,
        f"rope type {rope!r}": rope not in _ROPE_TYPES,
        "pretraining_tp > 1": getattr(config, "pretraining_tp", 1) != 1,
        "weights not all float32 on the CPU": any(
            p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()
        ),
        "module hooks": _hooked(model.modules()),
        "accelerate's offloading": any(hasattr(m, "_hf_hook") for m in model.modules()),
    }
    for reason, failed in checks.items():
        if failed:
            return reason
    return next(filter(None, map(_unlike_stock, model.model.layers)), None)


class LlamaDecode:
    """The decode forward of a LlamaForCausalLM (which `unsupported` passed) over bound bands."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        inner = model.model
        self._embed, self._rotary, self._norm = inner.embed_tokens, inner.rotary_emb, inner.norm
        self._layers = list(inner.layers[: model.config.num_hidden_layers])
        self._lm_head = model.lm_head
        norms = [(layer.input_layernorm, layer.post_attention_layernorm) for layer in self._layers]
        self._norms = [
            ((a.weight, a.variance_epsilon), (b.weight, b.variance_epsilon)) for a, b in norms
        ]
        weight, eps = self._norms[0][0]
        self._rms = _fused_rms if _fused_rms_equal(weight, eps) else _rms
        self._model, self._modules = model, list(model.modules())

    def overridden(self) -> bool:
        """A forward set on the model or a hook added since load (a wrapper, a fault injector):
        the HF forward runs them and this step would not, so it must not stand in."""
        return "forward" in vars(self._model) or _hooked(self._modules)

    def __call__(
        self, binding: DecodeBands, ids: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """ids and positions [rows, 1]; logits [rows, vocab] of each row's new token."""
        hidden = self._embed.forward(ids.view(-1))  # [rows, hidden]: no reshapes per linear
        cos, sin = self._rotary(hidden, positions)
        half = cos.shape[-1] // 2
        # rotate_half(x) * sin == x.roll(half) * sin with its first half negated, exactly
        # (negation is exact), and one roll replaces two slices, a negation and a cat.
        rotary = cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), -1).unsqueeze(1)
        mask = binding.bands[0].mask if len(binding.bands) == 1 else None
        for index, layer in enumerate(self._layers):
            into_attention, into_mlp = self._norms[index]
            normed = self._rms(hidden, *into_attention)
            hidden = hidden + self._attention(layer.self_attn, index, normed, rotary, binding, mask)
            post = self._rms(hidden, *into_mlp)
            mlp = layer.mlp
            gate = mlp.act_fn(mlp.gate_proj.forward(post))
            hidden = hidden + mlp.down_proj.forward(gate * mlp.up_proj.forward(post))
        hidden = self._rms(hidden, self._norm.weight, self._norm.variance_epsilon)
        return self._lm_head.forward(hidden)

    def _attention(
        self,
        attention: LlamaAttention,
        index: int,
        normed: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        binding: DecodeBands,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        rows, dim = normed.shape[0], attention.head_dim
        # [rows, heads, 1, head_dim] in one view: transformers' view and transpose give the same
        # elements in the same memory order (the length-1 dimension has no extent).
        shape = (rows, -1, 1, dim)
        query = _rotate(attention.q_proj.forward(normed).view(shape), *rotary)
        key = _rotate(attention.k_proj.forward(normed).view(shape), *rotary)
        value = attention.v_proj.forward(normed).view(shape)
        keys, values = binding.update(key, value, index)
        if len(binding.bands) == 1:
            # transformers' sdpa for one query token: query heads packed over their KV head.
            packed = query.reshape(rows, keys.shape[1], -1, dim)
            out = F.scaled_dot_product_attention(
                packed, keys, values, attn_mask=mask, scale=attention.scaling
            )
        else:
            out = binding.attend(attention, query, attention.scaling)
        return attention.o_proj.forward(out.reshape(rows, -1))


def _rms(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic for float32 (its casts are no-ops there)."""
    return weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps))


def _fused_rms(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The same norm in one call (six fewer dispatches), where it gives the same bits."""
    return torch.rms_norm(hidden, weight.shape, weight, eps)


def _fused_rms_equal(weight: torch.Tensor, eps: float) -> bool:
    """Whether torch's rms_norm gives _rms's bits here (it did on AMD EPYC and Intel Xeon with
    torch 2.13; another build may reduce in another order)."""
    sample = torch.randn(17, weight.shape[0], generator=torch.Generator().manual_seed(0))
    return torch.equal(_fused_rms(sample, weight, eps), _rms(sample, weight, eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb for one tensor, with the sign of rotate_half moved into sin."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def _unlike_stock(layer: nn.Module) -> str | None:
    """What in a decoder layer differs from transformers' Llama layer, which LlamaDecode repeats."""
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    parts: dict[str, tuple[object, type]] = {
        "layer": (layer, LlamaDecoderLayer),
        "attention": (attention, LlamaAttention),
        "MLP": (mlp, LlamaMLP),
        "input norm": (getattr(layer, "input_layernorm", None), LlamaRMSNorm),
        "post-attention norm": (getattr(layer, "post_attention_layernorm", None), LlamaRMSNorm),
    }
    for name, (part, stock) in parts.items():
        if type(part) is not stock or "forward" in vars(part):  # a hub kernel swaps forward in
            return f"{name}: not transformers' {stock.__name__} or its forward"
    linears = [getattr(attention, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [getattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")]
    if any(type(m) is not nn.Linear for m in linears):  # cpu_linear only reroutes plain ones
        return "a projection that is not nn.Linear"
    return None


def _rope_type(config: object) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    params = params or {}
    return str(params.get("rope_type", params.get("type", "default")))


def _hooked(modules: Iterable[nn.Module]) -> bool:
    """Hooks (output capture, a test's fault) run in the HF forward only."""
    global_hooks = (
        nn.modules.module._global_forward_hooks,
        nn.modules.module._global_forward_pre_hooks,
    )
    return any(global_hooks) or any(m._forward_hooks or m._forward_pre_hooks for m in modules)
