"""GGUF import: block decoding against `gguf.quants.dequantize`, name/shape/config round trips of tiny models written
by `tests/gguf_fixtures.py`, and malformed files."""

from __future__ import annotations

import logging
import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from dgemma.config import CheckpointError, ModelConfig
from dgemma.gguf_import import ARCH, CANVAS_KEY, gguf_config, gguf_header, gguf_path, gguf_tensors
from dgemma.loader import expected_tensors
from dgemma.quantize import Packed
from gguf_fixtures import (
    K_QUANT_CONFIG,
    encode,
    encode_q4_k,
    encode_q6_k,
    gguf_name,
    q4_k_m_types,
    random_blocks,
    write_gguf,
    write_tensors,
)
from tiny import random_model, tiny_config

PACKED = {Q.Q8_0: ("int8", 32), Q.Q5_0: ("int8", 32), Q.Q6_K: ("int8", 16), Q.Q4_0: ("int4", 32), Q.Q4_K: ("int4", 32)}
SHAPES = {"blk.0.attn_q.weight": (4, 512), "blk.0.ffn_gate_up_exps.weight": (3, 4, 256)}  # 2-D and experts [E, N, K]


def reference(path, name: str) -> torch.Tensor:
    """gguf's own numpy dequantization of a tensor, in HF shape."""
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(tuple(reversed(t.shape.tolist())))


def only(path) -> torch.Tensor | Packed:
    (_, value), *rest = list(gguf_tensors(path))
    assert not rest
    return value


def state_of(model) -> dict[str, torch.Tensor]:
    by_module = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {key: by_module[name].detach() for key, (name, _) in expected_tensors(model).items()}


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("qtype", list(PACKED))
def test_packed_decode_matches_gguf_dequantize(tmp_path, qtype, name):
    shape = SHAPES[name]
    path = write_tensors(tmp_path / "t.gguf", {name: (random_blocks(qtype, shape), qtype)})
    packed = only(path)
    kind, group = PACKED[qtype]
    assert isinstance(packed, Packed) and (packed.kind, packed.shape, packed.group_size) == (kind, shape, group)
    assert packed.scale.dtype == torch.float32
    assert_close(packed.dequantize(), reference(path, name))


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q4_1])
def test_float_and_fallback_types(tmp_path, qtype, caplog):
    shape = SHAPES["blk.0.ffn_gate_up_exps.weight"]
    data = (
        random_blocks(qtype, shape) if qtype == Q.Q4_1 else encode(np.random.default_rng(0).normal(size=shape), qtype)
    )
    path = write_tensors(tmp_path / "t.gguf", {"blk.0.ffn_gate_up_exps.weight": (data, qtype)})
    with caplog.at_level(logging.INFO, logger="dgemma.gguf_import"):
        value = only(path)
    assert isinstance(value, torch.Tensor) and value.shape == shape and value.dtype == torch.float32
    torch.testing.assert_close(value, reference(path, "blk.0.ffn_gate_up_exps.weight"), rtol=0, atol=0)
    assert ("dequantized" in caplog.text) == (qtype == Q.Q4_1)


@pytest.mark.parametrize("encoder, qtype", [(encode_q4_k, Q.Q4_K), (encode_q6_k, Q.Q6_K)])
def test_test_kquant_encoders_match_gguf(encoder, qtype):
    """The fixture's RTN encoders write blocks that gguf itself decodes to (roughly) the input."""
    x = np.random.default_rng(1).normal(size=(8, 256)).astype(np.float32)
    back = gguf.quants.dequantize(encoder(x), qtype).reshape(x.shape)
    step = 2 * np.abs(x).max() / (15 if qtype == Q.Q4_K else 63)
    assert np.abs(back - x).max() < step


def test_names_shapes_and_values_round_trip(tmp_path):
    """Every expected key appears exactly once, with the model's shape and values: no transposes, fused experts
    in HF row order."""
    model = random_model()
    path = write_gguf(tmp_path / "m.gguf", model, {"model.decoder.embed_tokens.weight": Q.F16})
    expected, state = expected_tensors(model), state_of(model)
    header = gguf_header(path)
    assert header == {k: ("F16" if "embed" in k else "F32", shape) for k, (_, shape) in expected.items()}
    items = list(gguf_tensors(path))
    assert sorted(k for k, _ in items) == sorted(expected)
    for key, value in items:
        torch.testing.assert_close(value, state[key], rtol=0, atol=1e-3 if "embed" in key else 0)


def test_config_round_trip(tmp_path):
    model = random_model()
    path = write_gguf(tmp_path / "m.gguf", model, canvas_length=16)
    config = ModelConfig.from_dict(gguf_config(path))
    assert config.text == model.config.text and config.canvas_length == 16
    assert config.eos_token_id == model.config.eos_token_id


def test_config_geometry_from_tensor_shapes(tmp_path):
    """Without the per-layer metadata keys, head dims, kv heads, layer types and widths come from the shapes."""
    model = random_model()
    optional = ("key_length", "key_length_swa", "head_count_kv", "sliding_window_pattern")
    omit = [f"{ARCH}.attention.{k}" for k in optional] + [f"{ARCH}.feed_forward_length"]
    path = write_gguf(tmp_path / "m.gguf", model, omit=(*omit, f"{ARCH}.expert_feed_forward_length"))
    assert ModelConfig.from_dict(gguf_config(path)) == model.config


@pytest.mark.parametrize("key", [CANVAS_KEY, f"{ARCH}.block_count", f"{ARCH}.expert_count"])
def test_missing_essential_key(tmp_path, key):
    path = write_gguf(tmp_path / "m.gguf", random_model(), omit=(key,))
    with pytest.raises(CheckpointError, match=key):
        gguf_config(path)


def test_quantized_model_decodes_like_gguf(tmp_path):
    """A K-quant mix as llama.cpp's Q4_K_M writes it (K multiple of 256): every tensor decodes exactly as gguf does,
    and close to the float weight."""
    model = random_model(tiny_config(**K_QUANT_CONFIG))
    path = write_gguf(tmp_path / "m.gguf", model, q4_k_m_types)
    header, state = gguf_header(path), state_of(model)
    assert {t for t, _ in header.values()} == {"Q4_K", "Q5_0", "Q8_0", "Q6_K", "F32"}
    refs = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for key, value in gguf_tensors(path):
        if header[key][0] == "F32":
            continue
        name = gguf_name(key)
        ref = gguf.quants.dequantize(refs[name].data, refs[name].tensor_type).reshape(header[key][1])
        assert_close(value.dequantize(), torch.from_numpy(ref))
        assert (value.dequantize() - state[key]).abs().max() < 0.25 * state[key].abs().max()


def test_q8_0_model_close_to_float(tmp_path):
    model = random_model()
    path = write_gguf(tmp_path / "m.gguf", model, lambda key: Q.Q8_0 if state_of(model)[key].dim() > 1 else Q.F32)
    state = state_of(model)
    for key, value in gguf_tensors(path):
        w = value.dequantize() if isinstance(value, Packed) else value
        assert isinstance(value, Packed) == (state[key].dim() > 1)
        torch.testing.assert_close(w, state[key], rtol=0, atol=float(state[key].abs().max()) / 100)


def test_not_gguf_and_truncated(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 4)
    path = write_gguf(tmp_path / "m.gguf", random_model())
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-4096])
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    for p in (bad, cut, empty, tmp_path / "missing.gguf"):
        for read in (gguf_header, gguf_config, lambda p: list(gguf_tensors(p))):
            with pytest.raises(CheckpointError):
                read(p)


@pytest.mark.parametrize("dim, qtype", [(400, Q.F32), (60, Q.Q8_0)])
def test_tensor_size_not_matching_type_and_shape(tmp_path, dim, qtype):
    """A header whose shape claims more bytes than the file holds, or rows that are not whole blocks."""
    x = np.ones((4, 64), dtype=np.float32)
    path = write_tensors(tmp_path / "t.gguf", {"blk.0.attn_q.weight": (encode(x, qtype), qtype)})
    raw = bytearray(path.read_bytes())
    at = raw.index(b"blk.0.attn_q.weight") + len("blk.0.attn_q.weight") + 4  # after the name: n_dims u32, ne u64s
    field = at if qtype != Q.F32 else at + 8  # ne0 (row length) or ne1 (rows)
    raw[field : field + 8] = struct.pack("<Q", dim)
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="t.gguf"):
        gguf_header(path)


def test_unknown_tensor_and_wrong_architecture(tmp_path):
    x = np.ones((4, 64), dtype=np.float32)
    path = write_tensors(tmp_path / "u.gguf", {"output.weight": (x, Q.F32)})
    with pytest.raises(CheckpointError, match=r"u\.gguf: unknown GGUF tensor 'output\.weight'"):
        gguf_header(path)
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), arch="llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="llama"):
        gguf_config(tmp_path / "llama.gguf")


def test_gguf_path(tmp_path):
    assert gguf_path(tmp_path) is None
    (tmp_path / "mmproj-F16.gguf").write_bytes(b"")
    model = tmp_path / "model-Q4_K_M.gguf"
    model.write_bytes(b"")
    assert gguf_path(tmp_path) == model and gguf_path(model) == model
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="2 GGUF files"):
        gguf_path(tmp_path)
    split = tmp_path / "split"
    split.mkdir()
    (split / "m-00001-of-00002.gguf").write_bytes(b"")
    (split / "m-00002-of-00002.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="split"):
        gguf_path(split)
