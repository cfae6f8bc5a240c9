"""A random-weight Llama and a made-up tokenizer, built with no download (the GPU check's model).

Throughput needs no trained weights, only the shapes: `1b` is TinyLlama-1.1B's geometry. The
tokenizer is a word-level vocabulary of the same size (`w0` ... `wN`) with a ChatML-like template,
so every id the model can emit decodes. The end-of-sequence row of the head is zeroed: under greedy
decoding its logit (0) never beats the largest of the random others, so every request runs to its
max tokens on both sides of the comparison.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, int]] = {
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 512,
    },
}
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
EOS = "<|im_end|>"
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def build(directory: Path, size: str, device: str, dtype: str, context: int = 0) -> dict[str, Any]:
    """Create, save (safetensors) and describe the model, its context at least `context` tokens
    (RoPE has no learned positions: random weights serve any length); returns its figures."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SIZES[size] | {
        "max_position_embeddings": max(SIZES[size]["max_position_embeddings"], context)
    }
    tokenizer = make_tokenizer(shape["vocab_size"])
    config = LlamaConfig(
        **shape,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=0,
    )
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: no host-side init of 1B weights
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    with torch.no_grad():
        model.lm_head.weight[config.eos_token_id].zero_()
    built = time.perf_counter() - started
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    return {
        "size": size,
        "parameters": parameters,
        "dtype": dtype,
        "context": shape["max_position_embeddings"],
        "build_s": built,
        "save_s": time.perf_counter() - started - built,
    }


def make_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + [f"w{i}" for i in range(vocab_size - len(SPECIAL))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token=EOS, pad_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def prompts(count: int, words: int, vocab_size: int, seed: int = 7) -> list[str]:
    """`count` different prompts of `words` vocabulary words each (fixed seed)."""
    pick = random.Random(seed)
    top = vocab_size - len(SPECIAL)
    return [" ".join(f"w{pick.randrange(top)}" for _ in range(words)) for _ in range(count)]
