"""The GGUF header reader agrees with gguf's own reader on metadata and tensor sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from cortex.neuron import sources
from cortex.neuron.gguf_header import GgufFormatError, read_header


def write_gguf(path: Path) -> Path:
    """A small GGUF with every kind of field a real one has: strings, numbers, bools and
    arrays (of strings, of ints, nested) before the numbers a footprint needs."""
    writer = GGUFWriter(path, "llama")
    writer.add_string("general.name", "tiny ünïcode")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "héllo", ""] * 50)
    writer.add_array("tokenizer.ggml.token_type", list(range(200)))
    writer.add_array("nested", [[1, 2], [3]])
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_uint64("big", 2**40)
    writer.add_block_count(3)
    writer.add_embedding_length(64)
    writer.add_head_count(8)
    writer.add_head_count_kv(2)
    writer.add_tensor("token_embd.weight", np.zeros((200, 64), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float16))
    writer.add_tensor("output_norm.weight", np.zeros(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_fields_and_tensor_sizes_match_ggufs_reader(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf")
    header = read_header(path)
    reference = GGUFReader(path)
    assert header.tensor_elements == [int(t.n_elements) for t in reference.tensors]
    assert header.fields["general.architecture"] == "llama"
    assert header.fields["general.name"] == "tiny ünïcode"
    assert header.fields["tokenizer.ggml.add_bos_token"] is True
    assert header.fields["llama.rope.freq_base"] == 10000.0
    assert header.fields["big"] == 2**40
    assert header.int_field("llama.block_count") == 3
    assert "tokenizer.ggml.tokens" not in header.fields  # arrays are skipped, not kept


def test_the_footprint_of_a_gguf_comes_from_its_header(tmp_path: Path) -> None:
    local = sources.LocalModel("file:tiny.gguf", "gguf", write_gguf(tmp_path / "tiny.gguf"))
    footprint = sources.footprint(local)
    assert footprint.parameters == 200 * 64 + 64 * 64 + 64
    assert footprint.kv_per_token("float32") == 2 * 3 * 2 * (64 // 8) * 4


@pytest.mark.parametrize(
    "content", [b"", b"GGML" + bytes(20), b"GGUF\x01\x00\x00\x00" + bytes(16), b"GGUF\x03\x00"]
)
def test_what_is_not_a_readable_gguf_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises((GgufFormatError, ValueError)):
        read_header(path)


def test_a_conversion_opens_its_gguf_once_and_builds_one_name_table(tmp_path: Path) -> None:
    import gguf

    from cortex.neuron import loader

    path = write_gguf(tmp_path / "tiny.gguf")
    names = gguf.get_tensor_name_map
    with loader._gguf_read_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(path) is first  # transformers' second and third opens
        assert type(first.data) is np.ndarray  # not np.memmap: see _gguf_read_once
        plain = GGUFReader(path)
        assert first.fields.keys() == plain.fields.keys()
        assert all(
            [bytes(part) for part in first.fields[key].parts]
            == [bytes(part) for part in plain.fields[key].parts]
            for key in plain.fields
        )
        assert all(
            np.array_equal(mine.data, theirs.data)
            for mine, theirs in zip(first.tensors, plain.tensors, strict=True)
        )
        assert gguf.GGUFReader(write_gguf(tmp_path / "other.gguf")) is not first
        table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3) is table  # once per module
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 4) is not table
        assert table.get_name("blk.0.attn_q") == names(gguf.MODEL_ARCH.LLAMA, 3).get_name(
            "blk.0.attn_q"
        )
    assert gguf.GGUFReader is GGUFReader and gguf.get_tensor_name_map is names  # restored
    assert GGUFReader(path) is not first
