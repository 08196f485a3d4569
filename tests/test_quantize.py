"""The quantization room: packed forms, kernels against their dequantize twins, the module swap, `dgemma quantize`
(streamed) against in-memory quantization, and every pre-quantized format loaded through the loader against a float
model holding the dequantized weights."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf_fixtures import K_QUANT_CONFIG, gguf_name, q4_k_m_types, write_gguf
from prequant_fixtures import write_fp8, write_nvfp4
from tiny import checkpoint_with_tokenizer, random_model, tiny_config

from dgemma.config import CheckpointError
from dgemma.export import quantize_checkpoint, save_model
from dgemma.loader import expected_tensors, load_model
from dgemma.model import DiffusionGemma, Experts, TiedEmbedding
from dgemma.quantize import (
    Packed,
    QuantEmbedding,
    QuantExperts,
    QuantLinear,
    QuantSpec,
    QuantWeight,
    Scheme,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    quantize_model,
    spec_of,
    unpack_nibbles,
)

BF16_REL = 2e-2  # the packed kernels run on bf16 activations: about 2^-8 relative per product, averaged


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def packed_of(kind: str, shape, group=None, seed=0) -> Packed:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    if kind == "int8":
        return quantize_int8(w, group)
    if kind == "int4":
        return quantize_int4(w, group or 64)
    *lead, n, k = shape
    if kind == "fp8":
        scale = w.abs().amax(-1, keepdim=True) / 448
        return Packed("fp8", (w / scale).to(torch.float8_e4m3fn), scale)
    codes = torch.randint(0, 16, (*lead, n, k), generator=g, dtype=torch.uint8)  # nvfp4
    scale = (torch.rand(*lead, n, k // 16, generator=g) + 0.5).to(torch.float8_e4m3fn)
    return Packed("nvfp4", pack_nibbles(codes), scale, global_scale=torch.rand(*lead, n, generator=g) * 0.01)


def test_nibbles_round_trip_and_order():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, 32) and torch.equal(unpack_nibbles(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | int(codes[0, 1]) << 4  # element 2k in the low nibble


@pytest.mark.parametrize(("fn", "bound"), [(lambda w: quantize_int8(w), 0.01), (lambda w: quantize_int4(w, 64), 0.12)])
def test_round_to_nearest_error_and_exact_grid(fn, bound):
    w = torch.randn(3, 48, 128)
    p = fn(w)
    assert rel(p.dequantize(), w) < bound
    again = fn(p.dequantize())  # a weight on the grid quantizes to itself
    assert rel(again.dequantize(), p.dequantize()) < 1e-6


KERNEL_CASES = [
    ("int8", (64, 128), None, "int8pack"),
    ("int8", (64, 128), 32, "packed"),  # group-wise int8 (GGUF Q8_0 / Q5_0 / Q6_K)
    ("int4", (64, 128), 64, "int4cpu"),
    ("int4", (64, 128), 32, "int4cpu"),
    ("int4", (40, 128), 64, "packed"),  # N not a multiple of 16: the packed kernel refuses it
    ("fp8", (64, 128), None, "packed"),
    ("nvfp4", (64, 128), 16, "packed"),
]


@pytest.mark.parametrize(("kind", "shape", "group", "layout"), KERNEL_CASES)
@pytest.mark.parametrize("experts", [False, True])
def test_kernels_match_their_dequantize_twin(kind, shape, group, layout, experts):
    full = (3, *shape) if experts else shape
    p = packed_of(kind, full, group)
    w = QuantWeight(full, spec_of(p))
    w.load(p, torch.float32, "cpu")
    assert w.layout == layout
    x = torch.randn(20, shape[-1])
    for e in (0, 2) if experts else (None,):
        twin = (
            p
            if e is None
            else Packed(p.kind, *(None if t is None else t[e] for t in (p.data, p.scale, p.zero, p.global_scale)))
        ).dequantize()
        y = w.matmul(x, e)
        if layout == "packed":
            assert torch.equal(y, F.linear(x, twin))
        else:
            assert rel(y, F.linear(x, twin)) < BF16_REL
        assert rel(w.dequantize(e, torch.float32), twin) < 1e-2  # through the kernel on the identity (bf16)


def test_quant_experts_grouped_matches_loop_twin_and_float_experts():
    cfg = tiny_config().text
    float_experts = Experts(cfg)
    torch.nn.init.normal_(float_experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(float_experts.down_proj, std=0.1)
    gu, dn = quantize_int4(float_experts.gate_up_proj.detach(), 32), quantize_int8(float_experts.down_proj.detach())
    q = QuantExperts(cfg, spec_of(gu), spec_of(dn))
    q.gate_up_proj.load(gu, torch.float32, "cpu")
    q.down_proj.load(dn, torch.float32, "cpu")
    with torch.no_grad():
        float_experts.gate_up_proj.copy_(gu.dequantize())
        float_experts.down_proj.copy_(dn.dequantize())
    x = torch.randn(24, cfg.hidden_size)
    weights, idx = torch.rand(24, 2), torch.randint(0, cfg.num_experts, (24, 2))
    grouped, loop = q(x, weights, idx, "grouped"), q(x, weights, idx, "loop")
    assert rel(grouped, loop) < BF16_REL
    assert rel(q(x, weights, idx, "grouped_mm"), grouped) == 0.0  # no grouped quantized kernel: the same path
    assert rel(grouped, float_experts(x, weights, idx, "loop")) < BF16_REL


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quant_embedding_lookup_head_and_mix(kind):
    emb = TiedEmbedding(300, 64)
    torch.nn.init.normal_(emb.weight)
    p = quantize_int8(emb.weight.detach()) if kind == "int8" else quantize_int4(emb.weight.detach(), 32)
    q = QuantEmbedding(300, 64, spec_of(p))
    q.CHUNK = 128  # several chunks, one partial
    q.weight.load(p, torch.float32, "cpu")
    with torch.no_grad():
        emb.weight.copy_(p.dequantize())
    ids = torch.randint(0, 300, (2, 7))
    assert torch.allclose(q(ids), emb(ids), atol=1e-6)
    h, probs = torch.randn(2, 7, 64), torch.softmax(torch.randn(14, 300), -1)
    assert rel(q.head(h), emb.head(h)) < (BF16_REL if kind == "int8" else 1e-6)
    assert rel(q.mix(probs), emb.mix(probs)) < 1e-5


def logits_of(model: DiffusionGemma, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.text.vocab_size, (1, 30), generator=g)
    cache = model.new_cache()
    model.encode(ids[:, :22], cache)
    first = model.denoise(ids[:, 22:], cache)
    return model.denoise(ids[:, 22:], cache, model.soft_embedding(first))


def dequantized_twin(model: DiffusionGemma, reference: DiffusionGemma) -> DiffusionGemma:
    """A float copy of `reference`'s architecture holding `model`'s weights, dequantized."""
    twin = random_model(reference.config)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantWeight):
            state[name] = module.dequantize(None, torch.float32)
        elif isinstance(module, QuantExperts):
            for w in ("gate_up_proj", "down_proj"):
                t = getattr(module, w)
                if isinstance(t, QuantWeight):
                    state[f"{name}.{w}"] = torch.stack([t.dequantize(e, torch.float32) for e in range(t.shape[0])])
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        state.setdefault(name, p)
    twin.load_state_dict(state, strict=False)
    return twin


def test_quantized_model_close_to_float():
    """The tiny random model is very sensitive (its init amplifies every rounding: a bf16 cast alone moves its logits
    by ~5 %), so the bounds are relative to that cast; the bundled model's losses are in scripts/bench_quant.py."""
    ref = logits_of(random_model())
    bf16 = rel(logits_of(random_model().to(torch.bfloat16)), ref)
    errors = {}
    for scheme in (Scheme("int8"), Scheme("int4", 32), Scheme("int4", 64, "bf16")):
        model = quantize_model(random_model(), scheme)
        kinds = {type(m).__name__ for m in model.modules()}
        assert {"QuantLinear", "QuantExperts"} <= kinds
        assert ("QuantEmbedding" in kinds) == (scheme.embedding == "int8")
        assert all(not isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith("router.proj"))
        errors[scheme] = rel(logits_of(model), ref)
    assert 0 < errors[Scheme("int8")] < 2 * bf16
    assert errors[Scheme("int8")] < errors[Scheme("int4", 32)] < 12 * bf16


def test_scheme_groups_fall_back_per_shape():
    s = Scheme("int4", 128)
    assert s.spec("linear", (2816, 704)) == QuantSpec("int4", 64)  # 704 = 11 * 64
    assert s.spec("linear", (2816, 2112)) == QuantSpec("int4", 64)
    assert s.spec("linear", (64, 40)) == QuantSpec("int8")  # no power-of-two group >= 16 divides 40
    assert s.spec("embedding", (10, 64)) == QuantSpec("int8")
    with pytest.raises(ValueError, match="power of two"):
        Scheme("int4", 48)


@pytest.mark.parametrize("scheme", [Scheme("int8"), Scheme("int4", 32)])
def test_streamed_quantize_loads_bit_identical_to_in_memory(tmp_path, scheme):
    src = save_model(random_model(), tmp_path / "src")
    stats = quantize_checkpoint(src, tmp_path / "q", scheme, shard_bytes=40_000)  # several shards
    assert stats["shards"] > 1 and (tmp_path / "q" / "model.safetensors.index.json").is_file()
    assert stats["out_bytes"] < stats["in_bytes"] / (3 if scheme.bits == "int4" else 2)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == scheme.config()
    loaded = load_model(tmp_path / "q")
    assert torch.equal(logits_of(loaded), logits_of(quantize_model(load_model(src), scheme)))
    with pytest.raises(FileExistsError):
        quantize_checkpoint(src, tmp_path / "q", scheme)
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "q2", scheme)


def test_quantized_checkpoint_validation(tmp_path):
    from safetensors.torch import load_file, save_file

    src = save_model(random_model(), tmp_path / "src")
    dst = tmp_path / "q"
    quantize_checkpoint(src, dst, Scheme("int4", 32))
    tensors = load_file(dst / "model.safetensors")
    key = "model.decoder.layers.0.self_attn.q_proj.weight_scale"
    bad = dict(tensors, **{key: tensors[key][:, :1].contiguous()})
    save_file(bad, dst / "model.safetensors")
    with pytest.raises(CheckpointError, match="q_proj.weight_zero"):
        load_model(dst)
    router = "model.decoder.layers.0.router.proj.weight"
    w = torch.randn(tensors[router].shape)
    p = quantize_int8(w)
    bad = dict(tensors, **{router: p.data, router + "_scale": p.scale})
    save_file(bad, dst / "model.safetensors")
    with pytest.raises(CheckpointError, match="router.proj.weight: quantized"):
        load_model(dst)


@pytest.mark.parametrize("fmt", ["nvfp4", "nvfp4_all", "fp8"])
def test_prequantized_checkpoints_match_their_dequantized_twin(tmp_path, fmt):
    source = random_model(tiny_config(), seed=3)
    write = {"nvfp4": write_nvfp4, "nvfp4_all": lambda d, m: write_nvfp4(d, m, experts_only=False), "fp8": write_fp8}
    path = write[fmt](tmp_path / fmt, source)
    model = load_model(path, dtype=torch.float32)
    experts = model.layers[0].experts
    assert isinstance(experts, QuantExperts) and experts.gate_up_proj.spec.kind == fmt.split("_")[0]
    assert isinstance(model.layers[0].self_attn.q_proj, QuantLinear) == (fmt != "nvfp4")
    assert not isinstance(model.embed_tokens, QuantEmbedding)
    twin = dequantized_twin(model, source)
    out, ref = logits_of(model), logits_of(twin)
    assert rel(out, ref) < 1e-5  # the lookup-table / fp8 paths dequantize per call: the same float math
    # and the source's model: far closer to it than another draw of the same init (4-bit on this sensitive tiny
    # model moves logits by tens of percent; int4 RTN does the same, see test_quantized_model_close_to_float)
    unrelated = rel(logits_of(random_model(tiny_config(), seed=4)), logits_of(source))
    assert rel(out, logits_of(source)) < 0.5 * unrelated


def test_gguf_checkpoint_matches_its_dequantized_twin(tmp_path):
    source = random_model(tiny_config(**K_QUANT_CONFIG))
    path = write_gguf(tmp_path / "model.gguf", source, q4_k_m_types)
    model = load_model(tmp_path)
    assert model.layers[0].experts.gate_up_proj.layout == "int4cpu"
    assert model.layers[0].experts.down_proj.spec == QuantSpec("int8", 32)
    assert isinstance(model.embed_tokens, QuantEmbedding)
    assert not isinstance(model.layers[0].router.proj, QuantLinear)  # stored Q4_K, dequantized: dgemma keeps it float
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    twin = random_model(source.config)
    state = {}

    for key, (name, shape) in expected_tensors(twin).items():
        t = reader[gguf_name(key)]
        state[name] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(shape)
    twin.load_state_dict(state, strict=False)
    ref = logits_of(twin)
    bf16 = rel(logits_of(copy.deepcopy(twin).bfloat16()), ref)
    assert rel(logits_of(model), ref) < bf16  # the packed kernels' bf16 activations cost less than a bf16 model


def test_cli_quantize_then_generate(tmp_path):
    src = checkpoint_with_tokenizer(tmp_path / "src", max_new_tokens=16)
    run = [sys.executable, "-m", "dgemma"]
    q = subprocess.run([*run, "quantize", str(src), str(tmp_path / "q4")], capture_output=True, text=True)
    assert q.returncode == 0, q.stderr
    assert "int4, group 64, embedding int8" in q.stdout
    gen = subprocess.run(
        [*run, "generate", "--model", str(tmp_path / "q4"), "the king", "--seed", "1", "--json"],
        capture_output=True,
        text=True,
    )
    assert gen.returncode == 0, gen.stderr
    assert len(json.loads(gen.stdout.strip().splitlines()[-1])["token_ids"]) > 0
    bad = subprocess.run([*run, "quantize", str(src), str(tmp_path / "q4")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sm80+ for the int4 kernel)")
@pytest.mark.gpu
def test_cuda_int4_kernel_matches_twin():
    p = packed_of("int4", (3, 256, 512), 64)
    w = QuantWeight(p.shape, spec_of(p))
    w.load(p, torch.bfloat16, "cuda")
    assert w.layout == "int4cuda"
    x = torch.randn(32, 512, device="cuda", dtype=torch.bfloat16)
    for e in range(3):
        twin = Packed(p.kind, p.data[e], p.scale[e], p.zero[e]).dequantize(torch.float32).cuda()
        assert rel(w.matmul(x, e), F.linear(x.float(), twin)) < BF16_REL


@pytest.mark.parametrize("scheme", [Scheme("int8"), Scheme("int4", 32)])
def test_quantized_batched_denoise_is_bitwise_solo(scheme):
    """The serving engine's batch invariance holds for quantized models: the packed kernels compute each row
    independently of the others (their bf16 cast is elementwise), and experts pad their rows as the float ones do."""
    from dgemma.config import GenerationSettings
    from dgemma.generate import Generation, Request, denoise_step
    from dgemma.model import Execution

    model = quantize_model(random_model(tiny_config(canvas_length=16, num_experts=8, top_k_experts=2), seed=2), scheme)
    exact = model.with_execution(Execution(moe="grouped", invariant=True))
    settings = GenerationSettings(max_new_tokens=32, steps=4, eos_token_ids=(1,))
    prompts = [[2, 5, 9], [2] + list(range(10, 40)), [2, 7, 7, 7, 7, 7]]

    def prefilled():
        gens = [Generation(exact, Request(tuple(p), settings, s, draft=True)) for s, p in enumerate(prompts)]
        for g in gens:
            g.prefill()
        return gens

    batch, solo = prefilled(), prefilled()
    for _ in range(3):
        for g, ev in zip(solo, denoise_step(exact, batch)):
            alone = denoise_step(exact, [g])[0]
            assert alone[0].draft == ev[0].draft and alone[0].entropy == ev[0].entropy


def test_quantize_in_bounded_slices_equals_whole_tensors(tmp_path, monkeypatch):
    """`dgemma quantize` reads and packs bounded blocks of rows (and experts one at a time): with blocks of a few
    rows the checkpoint it writes holds exactly the codes and scales of quantizing each tensor whole."""
    import dgemma.export
    import dgemma.quantize
    from safetensors.torch import load_file

    src = save_model(random_model(), tmp_path / "src")
    monkeypatch.setattr(dgemma.quantize, "PACK_ELEMENTS", 200)
    monkeypatch.setattr(dgemma.export, "PACK_ELEMENTS", 200)
    quantize_checkpoint(src, tmp_path / "q", Scheme("int4", 32))
    written, source = load_file(tmp_path / "q" / "model.safetensors"), load_file(src / "model.safetensors")
    for key in ("model.decoder.embed_tokens.weight", "model.decoder.layers.1.experts.gate_up_proj"):
        spec = QuantSpec("int8") if "embed" in key else QuantSpec("int4", 32)
        whole = quantize_int8(source[key]) if spec.kind == "int8" else quantize_int4(source[key], 32)
        for suffix, t in whole.tensors().items():
            assert torch.equal(written[key + suffix], t.to(written[key + suffix].dtype)), key + suffix


def test_model_nbytes_counts_quantized_weights():
    """`state_dict` misses the kernels' (non-persistent) buffers and packed layouts; serving sizes processes by it."""
    from dgemma.quantize import model_nbytes

    model = quantize_model(random_model(), Scheme("int4", 32))
    quant = sum(m.nbytes for m in model.modules() if isinstance(m, QuantWeight))
    assert quant > 0 and model_nbytes(model) >= quant + sum(p.nbytes for p in model.parameters())
    assert model_nbytes(model) > 2 * sum(t.nbytes for t in model.state_dict().values())


def test_cast_linear_matches_the_dequantized_weight(monkeypatch):
    """The CUDA int8 path (codes cast a block of rows at a time) is device-agnostic math: checked here on CPU."""
    import dgemma.quantize as q

    monkeypatch.setattr(q, "CAST_ROWS", 24)  # several blocks, one partial
    p = quantize_int8(torch.randn(100, 64))
    x = torch.randn(5, 64)
    assert torch.allclose(q._cast_linear(x, p.data, p.scale[:, 0]), F.linear(x, p.dequantize()), atol=1e-5)


def test_fp8_per_tensor_scalar_scale_loads(tmp_path, monkeypatch):
    import prequant_fixtures

    rtn = prequant_fixtures.fp8_rtn

    def scalar_scale(w):
        out = rtn(w)
        s = out["weight_scale"].float().max()
        return {"weight": (w.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn), "weight_scale": s.reshape(())}

    monkeypatch.setattr(prequant_fixtures, "fp8_rtn", scalar_scale)
    path = write_fp8(tmp_path / "fp8", random_model(tiny_config(), seed=3))
    model = load_model(path, dtype=torch.float32)
    assert model.layers[0].experts.gate_up_proj.spec == QuantSpec("fp8")
    assert torch.isfinite(logits_of(model)).all()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t, k: {k: t[k].reshape(-1)}, "needs >= 2 dims"),  # 1-D codes
        (lambda t, k: {k + "_scale": torch.tensor(1.0)}, "needs >= 2 dims"),  # 0-D scale
        (lambda t, k: {k + "_scale": t[k + "_scale"].to(torch.int8)}, "_scale: I8"),
        (lambda t, k: {k + "_zero": t[k + "_zero"].float().to(torch.float8_e4m3fn)}, "_zero: F8_E4M3"),
        (lambda t, k: {k + "_global": torch.ones(3)}, "_global: not part of a int4"),
    ],
)
def test_malformed_quantized_layout_is_a_checkpoint_error(tmp_path, edit, message):
    from safetensors.torch import load_file, save_file

    src = save_model(random_model(), tmp_path / "src")
    quantize_checkpoint(src, tmp_path / "q", Scheme("int4", 32))
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    key = "model.decoder.layers.0.self_attn.q_proj.weight"
    save_file({**tensors, **edit(tensors, key)}, tmp_path / "q" / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "q")
