"""Tiny GGUF files for the importer's tests: a dgemma model written the way llama.cpp's DiffusionGemma converter
lays it out (names, reversed ne, metadata keys), with any mix of block types.

`gguf.quants.quantize` has no K-quant encoder, so Q4_K and Q6_K come from the small round-to-nearest encoders here
(block layouts: notes/quantized-formats.md 1c); tests check them with `gguf.quants.dequantize`, independently of the
reader. `random_blocks` makes raw blocks of random bytes (finite fp16 fields) to exercise every code and scale bit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from dgemma.config import FULL, SLIDING
from dgemma.gguf_import import ARCH, CANVAS_KEY, ENCODER_SCALARS, GLOBAL_NAMES, LAYER_NAMES
from dgemma.loader import expected_tensors
from dgemma.model import DiffusionGemma

TO_GGUF = {v: k for k, v in LAYER_NAMES.items()}
TO_GGUF_GLOBAL = {v: k for k, v in GLOBAL_NAMES.items()}
FP16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q5_0: (0,), Q.Q4_1: (0, 2), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def gguf_name(key: str) -> str:
    """dgemma checkpoint key -> GGUF tensor name (the inverse of `gguf_import.checkpoint_key`)."""
    if key.startswith("model.encoder.language_model.layers."):
        return f"blk.{key.split('.')[4]}.{ENCODER_SCALARS[0]}"
    name = key.removeprefix("model.decoder.")
    if name.startswith("layers."):
        _, layer, rest = name.split(".", 2)
        return f"blk.{layer}.{TO_GGUF[rest]}"
    return TO_GGUF_GLOBAL[name]


def encode(x: np.ndarray, qtype: Q) -> np.ndarray:
    """Float [..., N, K] -> what `GGUFWriter.add_tensor` takes for `qtype` (raw uint8 blocks [..., N, bytes])."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == Q.F32:
        return x
    if qtype == Q.F16:
        return x.astype(np.float16)
    if qtype in (Q.Q4_K, Q.Q6_K):
        blocks = (encode_q4_k if qtype == Q.Q4_K else encode_q6_k)(x.reshape(-1, 256))  # [nb, bytes]
        return blocks.reshape(*x.shape[:-1], -1)
    return gguf.quants.quantize(x, qtype)


def encode_q6_k(b: np.ndarray) -> np.ndarray:
    """RTN Q6_K of blocks [nb, 256] -> uint8 [nb, 210]: ql · qh · int8 scales per 16 · fp16 d."""
    g = b.reshape(-1, 16, 16)  # [nb, 16 groups, 16]
    d = (np.abs(g).max(-1) / 31).max(-1) / 127  # [nb]
    d16 = d.astype(np.float16)
    sc = _div_round(np.abs(g).max(-1) / 31, d16.astype(np.float32)[:, None]).clip(-128, 127).astype(np.int8)
    eff = d16.astype(np.float32)[:, None] * sc  # [nb, 16]
    q = (_div_round(g, eff[..., None]).clip(-32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)  # [nb, halves, 128]
    ql = (q[..., :64] & 15) | ((q[..., 64:] & 15) << 4)  # [nb, 2, 64]
    hi = (q >> 4).reshape(-1, 2, 4, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [nb, 2, 32]
    n = len(b)
    return np.concatenate(
        [ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d16.view(np.uint8).reshape(-1, 2)], 1
    )


def encode_q4_k(b: np.ndarray) -> np.ndarray:
    """RTN Q4_K of blocks [nb, 256] -> uint8 [nb, 144]: fp16 d, dmin · 12 packed 6-bit scale/min bytes · qs."""
    g = b.reshape(-1, 8, 32)  # [nb, 8 sub-blocks, 32]
    lo = np.minimum(g.min(-1), 0)
    scale, mins = (g.max(-1) - lo) / 15, -lo  # [nb, 8]
    d16, dmin16 = (scale.max(-1) / 63).astype(np.float16), (mins.max(-1) / 63).astype(np.float16)
    sc = _div_round(scale, d16.astype(np.float32)[:, None]).clip(0, 63).astype(np.uint8)
    m = _div_round(mins, dmin16.astype(np.float32)[:, None]).clip(0, 63).astype(np.uint8)
    eff, off = d16.astype(np.float32)[:, None] * sc, dmin16.astype(np.float32)[:, None] * m
    q = _div_round(g + off[..., None], eff[..., None]).clip(0, 15).astype(np.uint8).reshape(-1, 4, 2, 32)
    scales = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            m[:, :4] | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4),
        ],
        1,
    )  # [nb, 12]
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)  # per 64-elem chunk: low = first 32, high = next 32
    return np.concatenate([d16.view(np.uint8).reshape(-1, 2), dmin16.view(np.uint8).reshape(-1, 2), scales, qs], 1)


def _div_round(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """round(x / s), 0 where s is 0."""
    return np.where(s != 0, np.round(x / np.where(s != 0, s, 1)), 0)


def random_blocks(qtype: Q, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random raw blocks for a tensor of HF shape [..., N, K]: uint8 [..., N, row bytes], fp16 fields finite."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (int(np.prod(shape)) // block, size), dtype=np.uint8)  # [nb, bytes]
    for at in FP16_FIELDS[qtype]:
        halves = rng.uniform(-0.05, 0.05, len(raw)).astype(np.float16)
        raw[:, at : at + 2] = halves.view(np.uint8).reshape(-1, 2)
    return raw.reshape(*shape[:-1], -1)


def write_tensors(path: Path, tensors: dict[str, tuple[np.ndarray, Q]], metadata: Callable | None = None) -> Path:
    """A GGUF of raw tensors {GGUF name: (array as `encode` returns it, type)}; `metadata(writer)` adds keys."""
    w = gguf.GGUFWriter(str(path), arch=ARCH)
    if metadata is not None:
        metadata(w)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_gguf(
    path: Path,
    model: DiffusionGemma,
    types: dict[str, Q] | Callable[[str], Q] | None = None,
    canvas_length: int | None = None,
    omit: tuple[str, ...] = (),
) -> Path:
    """Write `model` as a DiffusionGemma GGUF. `types`: checkpoint key -> ggml type (unlisted: F32); `omit`: metadata
    keys (full names) to leave out, to test what the reader derives from the tensor shapes."""
    pick = types if callable(types) else (lambda key: (types or {}).get(key, Q.F32))
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    tensors = {}
    for key, (module_name, _) in expected_tensors(model).items():
        qtype = pick(key)
        tensors[gguf_name(key)] = (encode(state[module_name].detach().float().numpy(), qtype), qtype)
    tensors["rope_freqs.weight"] = (_rope_freqs(model), Q.F32)
    entries = _metadata(model, canvas_length or model.config.canvas_length)
    return write_tensors(path, tensors, lambda w: [add(w, k, v) for k, (add, v) in entries.items() if k not in omit])


def _rope_freqs(model: DiffusionGemma) -> np.ndarray:
    """llama.cpp's freq factors for the full layers: 1.0 on rotated pairs, 1e30 on the unrotated ones."""
    text = model.config.text
    head_dim = next(g.head_dim for g in text.layers if g.layer_type == FULL)
    n_rot = int(head_dim * text.rope_parameters[FULL]["partial_rotary_factor"] / 2)
    return np.array([1.0] * n_rot + [1e30] * (head_dim // 2 - n_rot), dtype=np.float32)


def _metadata(model: DiffusionGemma, canvas_length: int) -> dict[str, tuple[Callable, object]]:
    """Every key `gguf_config` reads, as llama.cpp's Gemma4 / DiffusionGemma converters write them."""
    t = model.config.text
    u32, f32, arr = gguf.GGUFWriter.add_uint32, gguf.GGUFWriter.add_float32, gguf.GGUFWriter.add_array
    full = next(g for g in t.layers if g.layer_type == FULL)
    swa = next((g for g in t.layers if g.layer_type == SLIDING), full)
    a = ARCH
    return {
        f"{a}.block_count": (u32, t.num_hidden_layers),
        f"{a}.embedding_length": (u32, t.hidden_size),
        f"{a}.feed_forward_length": (u32, t.intermediate_size),
        f"{a}.expert_feed_forward_length": (u32, t.moe_intermediate_size),
        f"{a}.expert_count": (u32, t.num_experts),
        f"{a}.expert_used_count": (u32, t.top_k_experts),
        f"{a}.attention.head_count": (u32, t.num_attention_heads),
        f"{a}.attention.head_count_kv": (arr, [g.num_kv_heads for g in t.layers]),
        f"{a}.attention.key_length": (u32, full.head_dim),
        f"{a}.attention.value_length": (u32, full.head_dim),
        f"{a}.attention.key_length_swa": (u32, swa.head_dim),
        f"{a}.attention.value_length_swa": (u32, swa.head_dim),
        f"{a}.attention.sliding_window": (u32, t.sliding_window),
        f"{a}.attention.sliding_window_pattern": (arr, [g.is_sliding for g in t.layers]),
        f"{a}.attention.layer_norm_rms_epsilon": (f32, t.rms_norm_eps),
        f"{a}.rope.freq_base": (f32, t.rope_parameters[FULL]["rope_theta"]),
        f"{a}.rope.freq_base_swa": (f32, t.rope_parameters[SLIDING]["rope_theta"]),
        f"{a}.final_logit_softcapping": (f32, t.final_logit_softcapping),
        f"{a}.context_length": (u32, t.max_position_embeddings),
        "tokenizer.ggml.bos_token_id": (u32, t.bos_token_id),
        "tokenizer.ggml.eos_token_id": (u32, t.eos_token_id),
        "tokenizer.ggml.padding_token_id": (u32, t.pad_token_id),
        CANVAS_KEY: (u32, canvas_length),
    }


K_QUANT_CONFIG = {"hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 256, "head_dim": 64}
K_QUANT_CONFIG["global_head_dim"] = 64  # every K a multiple of 256, as K-quants need
Q4_K_M_MIX = {"experts.down_proj": Q.Q5_0, "mlp.down_proj": Q.Q8_0, "embed_tokens": Q.Q6_K, "v_proj": Q.Q6_K}


def q4_k_m_types(key: str) -> Q:
    """A type mix shaped like llama.cpp's Q4_K_M: Q4_K linears and experts, Q5_0 / Q8_0 / Q6_K where it falls back,
    F32 norms and scalars (the router too is Q4_K here, to exercise a quantized tensor dgemma keeps float)."""
    fallback = Q.Q4_K if key.endswith(("proj", "proj.weight")) else Q.F32
    return next((t for k, t in Q4_K_M_MIX.items() if k in key), fallback)
