"""Pre-quantized checkpoint readers (`dgemma.prequant`): detection, planning and exact assembly of ModelOpt NVFP4
and compressed-tensors FP8 checkpoints written by `tests.prequant_fixtures`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dgemma.config import CheckpointError, read_json
from dgemma.export import save_model
from dgemma.loader import expected_tensors, read_header
from dgemma.prequant import FP8, NVFP4, assemble, detect, plan
from dgemma.quantize import Packed
from prequant_fixtures import EXPERTS, FP8_CONFIG, MODELOPT_CONFIG, write_checkpoint, write_fp8, write_nvfp4
from tiny import random_model, tiny_config

# notes 1a: W[n, k] = E2M1[code[n, k]] * float32(weight_scale[n, k // 16]) * weight_scale_2, code 2k = low nibble.
# Bit-exact comparisons group the product as E2M1 * (block scale * global), the order `Packed.dequantize` (and
# ModelOpt's per-block scale) uses; the left-to-right product differs in the last fp32 bit (checked within 1 ulp).
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
EXPERT_KEYS = ("experts.gate_up_proj", "experts.down_proj")


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=3)  # H = 64, I = 32, dense 96: every K a multiple of 16


@pytest.fixture(scope="module")
def dirs(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("prequant")
    return {
        "nvfp4": write_nvfp4(root / "nvfp4", model, experts_only=False),
        "nvfp4_experts": write_nvfp4(root / "nvfp4_experts", model),
        "fp8": write_fp8(root / "fp8", model),
        "plain": save_model(model, root / "plain", dtype=torch.bfloat16),
    }


def table(path) -> dict[str, tuple[str, list[int]]]:
    return {k: (v["dtype"], v["shape"]) for k, v in read_header(path / "model.safetensors").items()}


def build(path, fmt) -> tuple[dict, dict]:
    """The plan and every assembled dgemma tensor of a fixture checkpoint."""
    planned, stored = plan(fmt, table(path)), load_file(str(path / "model.safetensors"))
    return planned, {k: assemble(k, kind, {s: stored[s] for s in src}) for k, (kind, _, src) in planned.items()}


def nvfp4_reference(stored: dict, base: str) -> torch.Tensor:
    q = stored[f"{base}.weight"]
    codes = torch.stack([q & 0x0F, q >> 4], dim=-1).flatten(-2).long()  # [N, K]
    scale = stored[f"{base}.weight_scale"].float().repeat_interleave(16, dim=-1)  # [N, K]
    return E2M1[codes] * (scale * stored[f"{base}.weight_scale_2"].float())


def nvfp4_left_to_right(stored: dict, base: str) -> torch.Tensor:
    q = stored[f"{base}.weight"]
    codes = torch.stack([q & 0x0F, q >> 4], dim=-1).flatten(-2).long()  # [N, K]
    return (
        E2M1[codes]
        * stored[f"{base}.weight_scale"].float().repeat_interleave(16, -1)
        * stored[f"{base}.weight_scale_2"]
    )


def fp8_reference(stored: dict, base: str) -> torch.Tensor:
    return stored[f"{base}.weight"].float() * stored[f"{base}.weight_scale"].float()


def reference(fn, stored: dict, key: str) -> torch.Tensor:
    """The independent dequantization of dgemma key `key` from the per-expert (or single) stored linears."""
    if not key.endswith(EXPERT_KEYS):
        return fn(stored, key[: -len(".weight")])
    prefix, name = key.rsplit(".", 1)
    parts = ("gate_proj", "up_proj") if name == "gate_up_proj" else ("down_proj",)
    n_experts = len({k for k in stored if k.startswith(prefix + ".") and k.endswith(f".{parts[0]}.weight")})
    return torch.stack([torch.cat([fn(stored, f"{prefix}.{j}.{p}") for p in parts]) for j in range(n_experts)])


def float_weights(model) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    return {key: state[name].detach() for key, (name, _) in expected_tensors(model).items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---- detect ---------------------------------------------------------------------------------------------------


def test_detect_recognises_both_formats_and_plain(dirs):
    for name, fmt in (("nvfp4", NVFP4), ("nvfp4_experts", NVFP4), ("fp8", FP8), ("plain", None)):
        assert detect(dirs[name], read_json(dirs[name] / "config.json")) == fmt, name


def test_detect_legacy_hf_quant_config_alone(dirs, tmp_path):
    shutil.copy(dirs["nvfp4"] / "hf_quant_config.json", tmp_path)
    assert detect(tmp_path, {"model_type": "diffusion_gemma"}) == NVFP4
    with pytest.raises(CheckpointError, match="compressed-tensors"):
        detect(tmp_path, {"quantization_config": FP8_CONFIG})


def _ct(**changes) -> dict:
    qc = json.loads(json.dumps(FP8_CONFIG))
    qc.update({k: v for k, v in changes.items() if k != "weights"})
    if "weights" in changes:
        qc["config_groups"]["group_0"]["weights"] = changes["weights"]
    return qc


@pytest.mark.parametrize(
    "qc, named",
    [
        (_ct(format="int-quantized"), "'int-quantized'"),
        (_ct(format="nvfp4-pack-quantized"), "'nvfp4-pack-quantized'"),
        (_ct(format="float-quantized", weights=None), "activation-only"),
        (_ct(weights={"num_bits": 4, "type": "float", "strategy": "group", "group_size": 16}), "4-bit float"),
        (_ct(weights={"num_bits": 8, "type": "int", "strategy": "channel"}), "8-bit int"),
        (_ct(weights={"num_bits": 8, "type": "float", "strategy": "block"}), "'block'"),
        (_ct(quantization_status="frozen"), "'frozen'"),
        ({"quant_method": "gptq", "bits": 4}, "'gptq'"),
        ({**MODELOPT_CONFIG, "quant_algo": "FP8"}, "quant_algo 'FP8'"),
    ],
)
def test_detect_refuses_unsupported_schemes(tmp_path, qc, named):
    with pytest.raises(CheckpointError, match=named):
        detect(tmp_path, {"quantization_config": qc})


def test_detect_accepts_group_and_tensor_fp8(tmp_path):
    for strategy in ("group", "tensor"):
        w = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "group_size": 32}
        assert detect(tmp_path, {"quantization_config": _ct(weights=w)}) == FP8


# ---- plan + assemble on the fixtures --------------------------------------------------------------------------


@pytest.mark.parametrize("name, fmt, bound", [("nvfp4", NVFP4, 0.15), ("fp8", FP8, 0.05)])
def test_assembled_weights_are_exact_and_close(dirs, model, name, fmt, bound):
    planned, built = build(dirs[name], fmt)
    stored = load_file(str(dirs[name] / "model.safetensors"))
    ref_fn = nvfp4_reference if fmt == NVFP4 else fp8_reference
    floats = float_weights(model)
    assert {k: s for k, (_, s, _) in planned.items()} == {k: s for k, (_, s) in expected_tensors(model).items()}
    quantized = 0
    for key, value in built.items():
        if planned[key][0] == "float":
            assert isinstance(value, torch.Tensor) and torch.equal(value, floats[key].to(torch.bfloat16)), key
            continue
        quantized += 1
        assert isinstance(value, Packed) and value.shape == planned[key][1], key
        assert torch.equal(value.dequantize(), reference(ref_fn, stored, key)), key
        if fmt == NVFP4:
            torch.testing.assert_close(
                value.dequantize(), reference(nvfp4_left_to_right, stored, key), rtol=1.2e-7, atol=0
            )
        assert rel_err(value.dequantize(), floats[key]) < bound, key
    attention = [k for k in planned if ".self_attn." in k and k.endswith("_proj.weight")]  # q, k, (v,) o
    assert quantized == len(model.layers) * (2 + 3) + len(attention)  # experts, dense MLP, attention


def test_nvfp4_layouts_and_per_half_global_scale(dirs, model):
    planned, built = build(dirs["nvfp4"], NVFP4)
    e, h, i = 4, 64, 32
    gate_up = built["model.decoder.layers.0.experts.gate_up_proj"]
    assert gate_up.data.shape == (e, 2 * i, h // 2) and gate_up.scale.shape == (e, 2 * i, h // 16)
    assert gate_up.scale.dtype == torch.float8_e4m3fn and gate_up.global_scale.shape == (e, 2 * i)
    stored = load_file(str(dirs["nvfp4"] / "model.safetensors"))
    for j in range(e):
        gate = stored[f"model.decoder.layers.0.experts.{j}.gate_proj.weight_scale_2"]
        up = stored[f"model.decoder.layers.0.experts.{j}.up_proj.weight_scale_2"]
        assert torch.equal(gate_up.global_scale[j], torch.cat([gate.expand(i), up.expand(i)]))
    assert built["model.decoder.layers.0.experts.down_proj"].global_scale.shape == (e, h)
    q = built["model.decoder.layers.0.self_attn.q_proj.weight"]
    assert q.kind == "nvfp4" and q.data.shape == (64, 32) and q.global_scale.shape == (64,)
    sources = planned["model.decoder.layers.0.experts.gate_up_proj"][2]
    assert sources[:6] == [f"model.decoder.layers.0.experts.0.{p}.{s}" for p in ("gate_proj", "up_proj") for s in
                           ("weight", "weight_scale", "weight_scale_2")]  # fmt: skip


def test_nvfp4_experts_only_keeps_the_rest_float(dirs):
    planned = plan(NVFP4, table(dirs["nvfp4_experts"]))
    kinds = {k: kind for k, (kind, _, _) in planned.items()}
    assert {k for k, v in kinds.items() if v == "nvfp4"} == {
        f"model.decoder.layers.{n}.{k}" for n in range(2) for k in EXPERT_KEYS
    }
    assert not any(k.endswith(".input_scale") for _, _, src in planned.values() for k in src)


def test_fp8_scales_are_fp32_per_channel(dirs):
    _, built = build(dirs["fp8"], FP8)
    down = built["model.decoder.layers.1.experts.down_proj"]
    assert down.data.dtype == torch.float8_e4m3fn and down.scale.dtype == torch.float32
    assert down.scale.shape == (4, 64, 1) and down.group_size == 32
    assert built["model.decoder.layers.1.self_attn.o_proj.weight"].scale.shape == (64, 1)


def test_float_experts_split_per_expert_are_fused(model, tmp_path):
    """Experts left in bf16 but stored per expert (an FP8 checkpoint that ignored them) fuse back exactly."""
    write_checkpoint(tmp_path, model, None, lambda w: {"weight": w.to(torch.bfloat16)}, EXPERTS, FP8_CONFIG)
    found = {k: (*v, tmp_path / "model.safetensors") for k, v in table(tmp_path).items()}  # the loader's triples
    planned = plan(FP8, found)
    assert {kind for kind, _, _ in planned.values()} == {"float"}
    stored = load_file(str(tmp_path / "model.safetensors"))
    floats = float_weights(model)
    for key in (f"{L0}.experts.gate_up_proj", f"{L0}.experts.down_proj"):
        kind, _, src = planned[key]
        assert torch.equal(assemble(key, kind, {s: stored[s] for s in src}), floats[key].to(torch.bfloat16))


def test_fp8_per_tensor_and_group_scales():
    w = torch.randn(8, 32).to(torch.float8_e4m3fn)
    key = "model.decoder.layers.0.mlp.up_proj"
    for scale in (torch.tensor(0.5), torch.full((1,), 0.25)):
        found = {f"{key}.weight": ("F8_E4M3", [8, 32]), f"{key}.weight_scale": ("F32", list(scale.shape))}
        kind, shape, _ = plan(FP8, found)[f"{key}.weight"]
        packed = assemble(f"{key}.weight", kind, {f"{key}.weight": w, f"{key}.weight_scale": scale})
        assert shape == (8, 32) and packed.scale.shape == (8, 1)
        assert torch.equal(packed.dequantize(), w.float() * scale.float())
    group = torch.rand(8, 4, dtype=torch.bfloat16)  # [N, K/8]
    found = {f"{key}.weight": ("F8_E4M3", [8, 32]), f"{key}.weight_scale": ("BF16", [8, 4])}
    kind, _, _ = plan(FP8, found)[f"{key}.weight"]
    packed = assemble(f"{key}.weight", kind, {f"{key}.weight": w, f"{key}.weight_scale": group})
    assert packed.group_size == 8
    assert torch.equal(packed.dequantize(), w.float() * group.float().repeat_interleave(8, -1))


# ---- plan refuses inconsistent tables -------------------------------------------------------------------------

L0 = "model.decoder.layers.0"


def _drop(prefix):
    """Drop every tensor whose key starts with `prefix` (end it with "." to drop one linear's tensors)."""
    return lambda t: {k: v for k, v in t.items() if not k.startswith(prefix)}


def _drop_key(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


def _set(key, dtype=None, shape=None):
    def edit(t):
        t = dict(t)
        t[key] = (dtype or t[key][0], shape if shape is not None else t[key][1])
        return t

    return edit


@pytest.mark.parametrize(
    "name, fmt, edit, named",
    [
        ("nvfp4", NVFP4, _drop(f"{L0}.experts.1.up_proj."), f"{L0}.experts.1.up_proj.weight is missing"),
        ("nvfp4", NVFP4, _drop_key(f"{L0}.experts.2.down_proj.weight_scale_2"), "experts.2.down_proj.weight_scale_2"),
        ("nvfp4", NVFP4, _set(f"{L0}.experts.0.gate_proj.weight_scale", shape=[32, 2]), "expected \\[32, 4\\]"),
        ("nvfp4", NVFP4, _set(f"{L0}.experts.3.down_proj.weight_scale", dtype="F32"), "experts.3.down_proj"),
        ("nvfp4", NVFP4, _set(f"{L0}.experts.0.down_proj.weight_scale_2", shape=[2]), "expected a scalar"),
        ("nvfp4", NVFP4, _set(f"{L0}.self_attn.q_proj.weight", dtype="BF16"), "q_proj.weight is BF16"),
        ("nvfp4", NVFP4, _set(f"{L0}.self_attn.k_proj.weight", shape=[32, 12]), "not a multiple of 16"),
        ("nvfp4", NVFP4, _drop_key(f"{L0}.self_attn.v_proj.weight_scale"), "v_proj.weight_scale is missing"),
        ("nvfp4", NVFP4, _drop_key(f"{L0}.self_attn.o_proj.weight"), "o_proj.weight_scale(_2)? has no weight"),
        ("fp8", FP8, _drop(f"{L0}.experts.0.gate_proj."), "experts.0.gate_proj.weight is missing"),
        ("fp8", FP8, _set(f"{L0}.experts.1.gate_proj.weight", shape=[16, 64]), "experts.1.gate_proj"),
        ("fp8", FP8, _set(f"{L0}.experts.2.up_proj.weight", dtype="U8"), "up_proj.weight is U8"),
        ("fp8", FP8, _set(f"{L0}.mlp.down_proj.weight_scale", dtype="I32"), "down_proj.weight_scale is I32"),
        ("fp8", FP8, _set(f"{L0}.mlp.down_proj.weight_scale", shape=[64, 5]), "expected \\[64, 1\\]"),
        ("fp8", FP8, _set("model.decoder.embed_tokens.weight", dtype="I8"), "embed_tokens.weight: dtype I8"),
    ],
)
def test_plan_refuses_inconsistent_tables(dirs, name, fmt, edit, named):
    with pytest.raises(CheckpointError, match=named):
        plan(fmt, edit(table(dirs[name])))


def test_plan_refuses_fused_and_split_experts_together(dirs):
    found = table(dirs["fp8"])
    found[f"{L0}.experts.down_proj"] = ("BF16", [4, 64, 32])
    with pytest.raises(CheckpointError, match="both fused and per expert"):
        plan(FP8, found)
