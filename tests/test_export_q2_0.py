"""llama.cpp Q2_0 export: the blocks hold ATQ's one-plane ternary weights bit for bit. References: a block written
by hand from the format's definition (64 weights, fp16 d, 2-bit q, value (q - 1)·d, four a byte, low bits first),
for the transcribed ggml dequantizer; that dequantizer, for the encoder and for the written file."""

import ctypes
import os
import shutil

import numpy as np
import pytest
import torch

from atq import QuantConfig, quantize
from atq.export import q2_0
from atq.export.gguf import ExportError, export_gguf, permute_rows, verify_gguf
from atq.export.gguf_read import read_gguf
from atq.ternary import PackedTernary, TernaryTensor

from .conftest import make_llama
from .test_export_gguf import bpe_tokenizer_dir

pytest.importorskip("gguf")


def test_the_transcribed_dequantizer_reads_a_block_written_by_hand():
    block = bytearray(18)
    block[0:2] = bytes([0x00, 0x38])  # fp16 0.5, little-endian
    block[2] = 0b11_10_01_00  # weights 0..3: q = 0, 1, 2, 3 (first in the low bits)
    block[3:18] = bytes([0b01_01_01_01] * 15)  # the other 60: q = 1, value 0
    values = q2_0.dequantize(np.frombuffer(bytes(block), dtype=np.uint8), 1, 64)
    assert values.dtype == np.float32
    assert values[0, :4].tolist() == [-0.5, 0.0, 0.5, 1.0] and not values[0, 4:].any()


def random_weight(rows, cols, group_size, generator_seed=0):
    generator = torch.Generator().manual_seed(generator_seed)
    codes = torch.randint(-1, 2, (rows, cols), dtype=torch.int8, generator=generator)
    scales = (torch.rand(rows, -(-cols // group_size), generator=generator) + 1e-3).half().float()
    return PackedTernary.pack(TernaryTensor(codes, scales, group_size), "2bit")


@pytest.mark.parametrize(("cols", "group_size"), [(576, 64), (1536, 64), (256, 128), (576, 192), (576, 576)])
def test_blocks_hold_the_ternary_weight_bit_for_bit(cols, group_size):
    weight = random_weight(48, cols, group_size)
    blocks = q2_0.encode(weight)
    assert blocks.shape == (48, cols // 64 * 18) and blocks.dtype == np.uint8
    assert np.array_equal(q2_0.dequantize(blocks, 48, cols), weight.dequantize(torch.float32).numpy())


def test_weights_q2_0_cannot_hold_are_refused():
    assert not q2_0.holds_exactly(random_weight(8, 576, 32))  # two scales in a block
    assert not q2_0.holds_exactly(random_weight(8, 96, 96))  # rows of 1.5 blocks
    two_planes = PackedTernary.pack(TernaryTensor(torch.zeros(2, 8, 128, dtype=torch.int8), torch.ones(2, 8, 2), 64),
                                    "base3")
    assert not q2_0.holds_exactly(two_planes)
    with pytest.raises(ValueError, match="group_size=32"):
        q2_0.encode(random_weight(8, 576, 32))


@pytest.fixture
def exported(tmp_path):
    model = make_llama(hidden=128)  # rows of 128 and 256 inputs, groups of 64: Q2_0 (not TQ2_0) everywhere
    quantize(model, QuantConfig(group_size=64), quiet=True)
    path = tmp_path / "m.gguf"
    report = export_gguf(model, path, tokenizer_dir=bpe_tokenizer_dir(tmp_path, 256))
    return model, path, report


def test_export_writes_every_group_64_layer_as_q2_0_exactly(exported):
    model, path, report = exported
    assert report["fallback"] == [] and report["verified_exact"] == 14
    assert report["bits_per_ternary_weight"] == pytest.approx(2.25)
    metadata, tensors = read_gguf(path)
    assert metadata["general.file_type"] == q2_0.FILE_TYPE
    for index, block in enumerate(model.model.layers):
        for hf, name, heads in [("self_attn.q_proj", "attn_q", 4), ("self_attn.k_proj", "attn_k", 2),
                                ("self_attn.v_proj", "attn_v", None), ("mlp.down_proj", "ffn_down", None)]:
            weight = block.get_submodule(hf).dequantize(torch.float32)
            weight = permute_rows(weight, heads) if heads else weight
            stored = tensors[f"blk.{index}.{name}.weight"]
            assert stored.ggml_type == 42 and stored.shape == tuple(weight.shape)
            assert np.array_equal(q2_0.dequantize(stored.data, *stored.shape), weight.numpy())


def test_a_corrupted_block_is_caught(exported, tmp_path):
    model, path, _ = exported
    bad = tmp_path / "bad.gguf"
    shutil.copy(path, bad)
    _, tensors = read_gguf(bad)
    target = tensors["blk.1.ffn_up.weight"]
    offset = target.offset + 18 * 5 + 7  # a code byte of the sixth block
    data = bytearray(bad.read_bytes())
    data[offset] ^= 0b01  # one weight's code moves by one step
    bad.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="blk.1.ffn_up.weight does not dequantize"):
        verify_gguf(bad, model)
    assert verify_gguf(path, model) == 14


@pytest.mark.parametrize(("choice", "expected"), [("q8_0", 8), ("f16", 1)])
def test_the_embedding_is_written_as_the_user_asks(tmp_path, choice, expected):
    model = make_llama(hidden=128)
    quantize(model, QuantConfig(group_size=64), quiet=True)
    export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=bpe_tokenizer_dir(tmp_path, 256), embedding=choice)
    _, tensors = read_gguf(tmp_path / "m.gguf")
    assert tensors["token_embd.weight"].ggml_type == expected
    assert tensors["output_norm.weight"].ggml_type == 0 and tensors["blk.0.attn_norm.weight"].ggml_type == 0


@pytest.mark.skipif(not os.environ.get("ATQ_GGML_LIB"), reason="set ATQ_GGML_LIB to a built libggml-base.so (llama.cpp's "
                    "own dequantize_row_q2_0) to check the blocks against it too")
def test_llama_cpps_compiled_dequantizer_agrees():
    library = ctypes.CDLL(os.environ["ATQ_GGML_LIB"])
    library.dequantize_row_q2_0.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    for cols, group_size in [(576, 64), (1536, 128), (576, 576)]:
        weight = random_weight(32, cols, group_size, 3)
        blocks = np.ascontiguousarray(q2_0.encode(weight))
        values = np.empty(32 * cols, dtype=np.float32)
        library.dequantize_row_q2_0(blocks.ctypes.data, values.ctypes.data, 32 * cols)
        assert np.array_equal(values.reshape(32, cols), weight.dequantize(torch.float32).numpy())


def test_an_untied_head_beside_a_block_quantized_embedding_is_written(tmp_path):
    """Q8_0 embedding and head modules hold no ``.weight``: the export must not take them for a tied pair and
    drop the head (llama.cpp would then use token_embd as the output)."""
    model = make_llama(hidden=128, tie=False)
    quantize(model, QuantConfig(group_size=64, embedding="q8_0"), quiet=True)
    for choice in (None, "f16"):
        path = tmp_path / f"m-{choice}.gguf"
        report = export_gguf(model, path, tokenizer_dir=bpe_tokenizer_dir(tmp_path / str(choice), 256),
                             embedding=choice)
        _, tensors = read_gguf(path)
        assert "output.weight" in tensors and "lm_head" in report["tensors"]


def test_a_truncated_file_is_named_not_checked(exported, tmp_path):
    model, path, _ = exported
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-4000])
    with pytest.raises(ExportError, match="cut.gguf.*truncated GGUF file: tensor .* ends past the end"):
        verify_gguf(cut, model)
