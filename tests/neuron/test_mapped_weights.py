"""Mapped loading: the same model as from_pretrained, its weights views of the file; anything it
cannot load as it is falls back."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama_config
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from cortex.neuron.mapped_weights import load_causal_mapped, map_safetensors

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tied head, as SmolLM2 has: the file holds no lm_head tensor."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    config = tiny_llama_config(vocab_size=64)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    assert not any(k.startswith("lm_head") for k in load_file(directory / "model.safetensors"))
    return directory


def test_the_mapped_model_is_the_one_from_pretrained_builds(tiny: Path) -> None:
    mapped = load_causal_mapped(tiny, torch.float32, CPU)
    reference = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    assert mapped is not None and not mapped.training
    assert mapped.config._attn_implementation == "sdpa"
    ours, theirs = mapped.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert dict(mapped.named_buffers()).keys() == dict(reference.named_buffers()).keys()
    assert not any(b.is_meta for b in mapped.buffers())
    assert mapped.lm_head.weight is mapped.model.embed_tokens.weight  # tied, not copied
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.inference_mode():
        assert torch.equal(mapped(ids).logits, reference(ids).logits)
    assert mapped.generation_config.to_diff_dict() == reference.generation_config.to_diff_dict()


def test_weights_are_views_of_the_file_not_copies(tiny: Path) -> None:
    tensors = map_safetensors(tiny / "model.safetensors")
    assert tensors.keys() == load_file(tiny / "model.safetensors").keys()
    # One mapping holds them all: the tensors lie apart in memory as they do in the file.
    with (tiny / "model.safetensors").open("rb") as file:
        header = json.loads(file.read(struct.unpack("<Q", file.read(8))[0]))
    base = min(t.data_ptr() - header[k]["data_offsets"][0] for k, t in tensors.items())
    assert all(t.data_ptr() - header[k]["data_offsets"][0] == base for k, t in tensors.items())
    weight = tensors["model.norm.weight"]
    weight.add_(1.0)  # a private mapping: writing never reaches the file
    assert torch.equal(load_file(tiny / "model.safetensors")["model.norm.weight"], weight - 1.0)


def test_another_dtype_is_cast_on_load(tiny: Path) -> None:
    mapped = load_causal_mapped(tiny, torch.bfloat16, CPU)
    assert mapped is not None
    assert {p.dtype for p in mapped.parameters()} == {torch.bfloat16}


def test_tensor_names_the_model_does_not_know_fall_back(tiny: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for name in ("config.json", "generation_config.json"):
        (renamed / name).write_bytes((tiny / name).read_bytes())
    tensors = load_file(tiny / "model.safetensors")
    save_file({"transformer." + k: v for k, v in tensors.items()}, renamed / "model.safetensors")
    assert load_causal_mapped(renamed, torch.float32, CPU) is None


def test_a_directory_without_safetensors_falls_back(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny / "config.json").read_bytes())
    assert load_causal_mapped(tmp_path, torch.float32, CPU) is None


def test_a_model_that_keeps_some_weights_in_float32_falls_back(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(LlamaForCausalLM, "_keep_in_fp32_modules", ["lm_head"])
    assert load_causal_mapped(tiny, torch.bfloat16, CPU) is None
