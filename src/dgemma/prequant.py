"""Readers for pre-quantized safetensors checkpoints: ModelOpt NVFP4 and compressed-tensors FP8 (notes 1a, 1b).

Both formats store the routed experts split per expert (`experts.{j}.{gate,up,down}_proj`), each a quantized linear
with sibling scale tensors, while dgemma's model holds fused 3-D experts. Three steps, driven by the loader:

- `detect`: which format a directory holds, from `config.json["quantization_config"]` and `hf_quant_config.json`;
  a scheme that cannot be loaded raises `CheckpointError` naming what is unsupported.
- `plan`: from the checkpoint's tensor table alone (names, dtypes, shapes; nothing is read), each dgemma key with the
  kind of tensor it becomes, its logical shape and the source tensors it is built from, all validated up front.
- `assemble`: one dgemma tensor from its sources, losslessly: a float tensor as stored, or a `quantize.Packed`
  ("nvfp4": E2M1 codes, e4m3 block scales, ModelOpt's per-tensor `weight_scale_2` spread to a per-row global
  scale; "fp8": e4m3 values and fp32 scales [.., N, G]).

It deliberately does not compare keys or shapes with the model (the loader does, against `expected_tensors`), and
it ignores the formats' ignore/exclude lists: a linear is quantized exactly when its stored tensors say so (notes
1a). Activation and KV-cache scales (`input_scale`, `k_scale`, `v_scale`) are dropped: dgemma runs weight-only.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .config import CheckpointError, read_json
from .quantize import NVFP4_BLOCK, Packed

NVFP4 = "modelopt-nvfp4"
FP8 = "compressed-tensors-fp8"
FORMATS = (NVFP4, FP8)
QUANT_DTYPE = {NVFP4: "U8", FP8: "F8_E4M3"}  # the stored dtype of a quantized `.weight`
FLOAT_DTYPES = ("F32", "BF16", "F16")
DROPPED = (".input_scale", ".k_scale", ".v_scale")  # activation / KV-cache scales: unused by weight-only kernels
SCALES = (".weight_scale", ".weight_scale_2")
SOURCES = {
    "float": ("weight",),
    "nvfp4": ("weight", "weight_scale", "weight_scale_2"),
    "fp8": ("weight", "weight_scale"),
}
EXPERT_SUFFIXES = {"weight", "weight_scale", "weight_scale_2", "input_scale"}
EXPERT = re.compile(r"^(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")
FUSED = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}  # dgemma expert tensor -> parts
CT_STRATEGIES = ("channel", "tensor", "group")
SUPPORTED = "ModelOpt NVFP4 (quant_method 'modelopt') and compressed-tensors FP8 (format 'float-quantized')"

Entry = tuple[str, tuple[int, ...], list[str]]  # (kind, logical [.., N, K] shape, source keys)


# ---- detect ---------------------------------------------------------------------------------------------------


def detect(model_dir: Path, raw_config: dict) -> str | None:
    """The pre-quantized format of a checkpoint directory (`NVFP4`, `FP8`), or None for a plain float one.
    ModelOpt writes `hf_quant_config.json` and/or `config.json["quantization_config"]` (notes 1a); when both are
    there they must agree. KV-cache and activation schemes are ignored (dgemma runs weight-only)."""
    qc = raw_config.get("quantization_config")
    legacy = Path(model_dir) / "hf_quant_config.json"
    if legacy.is_file():
        _check_modelopt(read_json(legacy).get("quantization"), "hf_quant_config.json 'quantization'")
    if qc is None:
        return NVFP4 if legacy.is_file() else None
    if not isinstance(qc, dict):
        raise CheckpointError("config.json quantization_config must be a JSON object")
    method = qc.get("quant_method")
    if legacy.is_file() and method != "modelopt":
        raise CheckpointError(f"hf_quant_config.json says ModelOpt NVFP4 but config.json's quant_method is {method!r}")
    if method == "modelopt":
        _check_modelopt(qc, "config.json quantization_config")
        return NVFP4
    if method == "compressed-tensors":
        _check_compressed_tensors(qc)
        return FP8
    raise CheckpointError(f"quantization_config quant_method {method!r} is not supported; dgemma reads {SUPPORTED}")


def _check_modelopt(q, where: str) -> None:
    """ModelOpt: only NVFP4 with 16-element blocks (the other quant_algos store other tensors)."""
    if not isinstance(q, dict):
        raise CheckpointError(f"{where} is missing or not a JSON object")
    if (algo := q.get("quant_algo")) != "NVFP4":
        raise CheckpointError(f"ModelOpt quant_algo {algo!r} ({where}) is not supported; only 'NVFP4' is")
    config_groups = q.get("config_groups") or {}
    if not isinstance(config_groups, dict):
        raise CheckpointError(f"{where} config_groups must be a JSON object")
    groups = [g.get("weights") or {} for g in config_groups.values() if isinstance(g, dict)]
    sizes = [q.get("group_size", NVFP4_BLOCK)] + [
        w.get("group_size", NVFP4_BLOCK) for w in groups if isinstance(w, dict)
    ]
    if any(type(s) is not int or s != NVFP4_BLOCK for s in sizes):
        raise CheckpointError(f"ModelOpt NVFP4 group_size {sizes} ({where}); only 16 is supported")


def _check_compressed_tensors(qc: dict) -> None:
    """compressed-tensors: FP8 weights (per channel, per tensor or per group), stored compressed."""
    if (fmt := qc.get("format")) != "float-quantized":
        raise CheckpointError(
            f"compressed-tensors format {fmt!r} is not supported; only 'float-quantized' (FP8 weights) is"
        )
    if (status := qc.get("quantization_status", "compressed")) != "compressed":
        raise CheckpointError(f"compressed-tensors quantization_status {status!r}: only 'compressed' checkpoints load")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError("compressed-tensors quantization_config has no config_groups")
    for name, group in groups.items():
        _check_ct_group(name, group if isinstance(group, dict) else {})


def _check_ct_group(name: str, group: dict) -> None:
    if (fmt := group.get("format", "float-quantized")) != "float-quantized":
        raise CheckpointError(f"compressed-tensors group {name!r} has format {fmt!r}; only 'float-quantized' is")
    w = group.get("weights")
    if not isinstance(w, dict):
        raise CheckpointError(
            f"compressed-tensors group {name!r} quantizes no weights (an activation-only scheme) and is not supported"
        )
    if (w.get("type"), w.get("num_bits")) != ("float", 8):
        raise CheckpointError(
            f"compressed-tensors group {name!r}: {w.get('num_bits')}-bit {w.get('type')} weights are not supported;"
            " only 8-bit float (FP8)"
        )
    if (strategy := w.get("strategy")) not in CT_STRATEGIES:
        raise CheckpointError(f"compressed-tensors group {name!r}: weight strategy {strategy!r} is not supported")
    if w.get("symmetric") is False:
        raise CheckpointError(f"compressed-tensors group {name!r}: asymmetric FP8 weights are not supported")


# ---- plan -----------------------------------------------------------------------------------------------------


def plan(fmt: str, found: dict[str, tuple]) -> dict[str, Entry]:
    """dgemma key -> (kind, logical shape, source keys), from the checkpoint's key -> (dtype, shape[, ...]) table."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown pre-quantized format {fmt!r}; expected one of {FORMATS}")
    table = {k: (v[0], [int(s) for s in v[1]]) for k, v in found.items()}
    out: dict[str, Entry] = {}
    experts: dict[str, dict[int, dict[str, dict[str, tuple]]]] = {}  # prefix -> expert -> proj -> suffix -> info
    for key, (dtype, shape) in table.items():
        if m := EXPERT.match(key):
            prefix, j, proj, suffix = m.groups()
            experts.setdefault(prefix, {}).setdefault(int(j), {}).setdefault(proj, {})[suffix] = (dtype, shape)
        elif entry := _plan_tensor(fmt, key, table):
            _put(out, key, entry)
    for prefix, by_expert in experts.items():
        for name, entry in _plan_experts(fmt, prefix, by_expert).items():
            _put(out, name, entry)
    return out


def _plan_tensor(fmt: str, key: str, table: dict[str, tuple]) -> Entry | None:
    """The entry of one non-expert tensor: a quantized linear's `.weight`, a float tensor, or None for the scales
    (read with their weight) and the dropped activation / KV-cache scales."""
    dtype, shape = table[key]
    if key.endswith(DROPPED):
        return None
    if key.endswith(SCALES):
        if key.rsplit(".", 1)[0] + ".weight" not in table:
            raise CheckpointError(f"{key} has no weight beside it")
        return None
    if key.endswith(".weight") and (dtype == QUANT_DTYPE[fmt] or key + "_scale" in table):
        base = key[: -len(".weight")]
        siblings = {s: table[f"{base}.{s}"] for s in SOURCES["nvfp4"] if f"{base}.{s}" in table}
        kind, nk, _ = _linear(fmt, base, siblings)
        return kind, nk, [f"{base}.{s}" for s in SOURCES[kind]]
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{key}: dtype {dtype} is not a float type and not part of a quantized linear")
    return "float", tuple(shape), [key]


def _put(out: dict, key: str, entry: Entry) -> None:
    if key in out:
        raise CheckpointError(f"{key} is stored both fused and per expert")
    out[key] = entry


def _plan_experts(fmt: str, prefix: str, by_expert: dict) -> dict[str, Entry]:
    """The fused gate_up_proj [E, 2I, H] and down_proj [E, H, I] from experts 0..E-1, each part checked."""
    n_experts = max(by_expert) + 1
    out = {}
    for fused, projs in FUSED.items():
        first, sources = None, []
        for j in range(n_experts):
            for proj in projs:
                base = f"{prefix}.{j}.{proj}"
                tensors = by_expert.get(j, {}).get(proj, {})
                if extra := sorted(set(tensors) - EXPERT_SUFFIXES):
                    raise CheckpointError(f"{base}: unexpected tensors {extra}")
                desc = _linear(fmt, base, tensors)
                first = first or desc
                if desc != first:
                    raise CheckpointError(f"{base}: {_describe(desc)}, but {prefix}.0.{projs[0]} is {_describe(first)}")
                sources += [f"{base}.{s}" for s in SOURCES[desc[0]]]
        kind, (n, k), _ = first
        out[f"{prefix}.{fused}"] = (kind, (n_experts, n * len(projs), k), sources)
    return out


def _describe(desc: tuple) -> str:
    kind, (n, k), groups = desc
    return f"{kind} [{n}, {k}]" + (f" with {groups} scale groups per row" if kind != "float" else "")


def _linear(fmt: str, base: str, tensors: dict[str, tuple]) -> tuple[str, tuple[int, int], int]:
    """(kind, logical [N, K], scale groups per row) of one stored linear from its tensors by suffix."""
    if "weight" not in tensors:
        raise CheckpointError(f"{base}.weight is missing")
    dtype, shape = tensors["weight"]
    if dtype in FLOAT_DTYPES and not tensors.keys() & {"weight_scale", "weight_scale_2"}:
        if len(shape) != 2:
            raise CheckpointError(f"{base}.weight has shape {shape}; expected a 2-D [N, K] linear weight")
        return "float", tuple(shape), 0
    return _nvfp4_linear(base, tensors) if fmt == NVFP4 else _fp8_linear(base, tensors)


def _nvfp4_linear(base: str, t: dict[str, tuple]) -> tuple[str, tuple[int, int], int]:
    """U8 weight [N, K/2], F8_E4M3 weight_scale [N, K/16], F32 scalar weight_scale_2 (notes 1a)."""
    n, half = _want(base, t, "weight", "U8", 2)
    k = 2 * half
    if k % NVFP4_BLOCK:
        raise CheckpointError(f"{base}.weight: K = {k} (2 x {half} packed bytes) is not a multiple of {NVFP4_BLOCK}")
    if (scale := _want(base, t, "weight_scale", "F8_E4M3", 2)) != [n, k // NVFP4_BLOCK]:
        raise CheckpointError(f"{base}.weight_scale has shape {scale}; expected [{n}, {k // NVFP4_BLOCK}] (K / 16)")
    if _want(base, t, "weight_scale_2", "F32", None) not in ([], [1]):
        raise CheckpointError(f"{base}.weight_scale_2 has shape {t['weight_scale_2'][1]}; expected a scalar")
    return "nvfp4", (n, k), k // NVFP4_BLOCK


def _fp8_linear(base: str, t: dict[str, tuple]) -> tuple[str, tuple[int, int], int]:
    """F8_E4M3 weight [N, K], float weight_scale [N, 1] (channel), [N, K/g] (group) or one element (tensor)."""
    n, k = _want(base, t, "weight", "F8_E4M3", 2)
    if "weight_scale" not in t or t["weight_scale"][0] not in FLOAT_DTYPES:
        raise CheckpointError(f"{base}.weight_scale is {_got(t, 'weight_scale')}; expected a float scale")
    scale = t["weight_scale"][1]
    if len(scale) <= 2 and all(s == 1 for s in scale):
        return "fp8", (n, k), 1  # per tensor (or one row): broadcast to [N, 1]
    if len(scale) != 2 or scale[0] != n or k % scale[1]:
        raise CheckpointError(f"{base}.weight_scale has shape {scale}; expected [{n}, 1] or [{n}, K/g] with K = {k}")
    return "fp8", (n, k), scale[1]


def _want(base: str, t: dict[str, tuple], suffix: str, dtype: str, ndim: int | None) -> list[int]:
    """The shape of `base.suffix`, checked to exist with `dtype` (and `ndim` dims)."""
    if suffix not in t or t[suffix][0] != dtype or (ndim is not None and len(t[suffix][1]) != ndim):
        want = f"{dtype}" + (f" {ndim}-D" if ndim else "")
        raise CheckpointError(f"{base}.{suffix} is {_got(t, suffix)}; expected {want}")
    return t[suffix][1]


def _got(t: dict[str, tuple], suffix: str) -> str:
    return f"{t[suffix][0]} {t[suffix][1]}" if suffix in t else "missing"


# ---- assemble -------------------------------------------------------------------------------------------------


def assemble(key: str, kind: str, sources: dict[str, torch.Tensor]) -> torch.Tensor | Packed:
    """The dgemma tensor `key` built from its source tensors (as listed by `plan`)."""
    prefix, name = key.rsplit(".", 1)
    if name in FUSED and prefix.endswith(".experts"):
        n_experts = 1 + max(int(m.group(2)) for s in sources if (m := EXPERT.match(s)) and m.group(1) == prefix)
        rows = [[_one(kind, f"{prefix}.{j}.{p}", sources) for p in FUSED[name]] for j in range(n_experts)]
        return _join([_join(parts, torch.cat) for parts in rows], torch.stack)  # [E, 2I, H] / [E, H, I]
    if kind == "float":
        return sources[key]
    return _one(kind, key[: -len(".weight")], sources)


def _one(kind: str, base: str, sources: dict[str, torch.Tensor]) -> torch.Tensor | Packed:
    """One stored linear `base` as a float weight [N, K] or a 2-D Packed."""
    w = sources[f"{base}.weight"]
    if kind == "float":
        return w
    want = {"nvfp4": torch.uint8, "fp8": torch.float8_e4m3fn}[kind]
    if w.dtype != want:
        raise CheckpointError(f"{base}.weight is {w.dtype}; expected {want} for {kind}")
    n = w.shape[0]
    if kind == "nvfp4":
        g = sources[f"{base}.weight_scale_2"].float().reshape(())  # per-tensor global -> every row
        return Packed("nvfp4", w, sources[f"{base}.weight_scale"], global_scale=g.expand(n).clone())  # [N]
    s = sources[f"{base}.weight_scale"].float()
    s = s.reshape(1, 1).expand(n, 1) if s.numel() == 1 else s.reshape(n, -1)  # [N, G]
    return Packed("fp8", w, s.contiguous())


def _join(parts: list, op) -> torch.Tensor | Packed:
    """`op` (torch.cat over rows, torch.stack over experts) applied to float weights or to every Packed field."""
    if isinstance(parts[0], torch.Tensor):
        return op(parts)
    glob = None if parts[0].global_scale is None else op([p.global_scale for p in parts])
    return Packed(parts[0].kind, op([p.data for p in parts]), op([p.scale for p in parts]), global_scale=glob)
