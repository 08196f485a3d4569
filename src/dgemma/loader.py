"""Load a DiffusionGemma checkpoint directory into `DiffusionGemma` (spec section b).

Safetensors only: every shard header is validated by hand (size, JSON, dtypes, offsets inside the file, no gaps or
overlaps) before the file is memory-mapped, and every tensor name/shape/dtype is checked against what `config.json`
implies. Vision-tower tensors are skipped. Nothing in the directory is ever executed: no pickle, no `auto_map`, no
`*.py`. All checkpoint-name surgery lives in `checkpoint_name` / `expected_tensors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from . import gguf_import, prequant
from .config import CheckpointError, ConfigError, GenerationSettings, ModelConfig, read_json
from .model import DEFAULT_EXECUTION, DiffusionGemma, Execution
from .quantize import Packed, QuantSpec, swap_modules

log = logging.getLogger(__name__)

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # config.json names
DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # config.json name -> safetensors name
ITEM_SIZES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
MAX_HEADER = 100 * 1024 * 1024
SKIPPED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
ENCODER_SCALAR = "encoder_layer_scalar"


def checkpoint_name(param: str) -> str:
    """Module name -> checkpoint key (the decoder stack holds all shared weights, spec b.2)."""
    if param.endswith(ENCODER_SCALAR):
        return "model.encoder.language_model." + param.replace(ENCODER_SCALAR, "layer_scalar")
    return "model.decoder." + param


def expected_tensors(model: DiffusionGemma) -> dict[str, tuple[str, tuple[int, ...]]]:
    """checkpoint key -> (module name, shape) for every persistent tensor the model needs."""
    names = dict(model.named_parameters())
    names.update((n, b) for n, b in model.named_buffers() if "inv_freq" not in n)
    return {checkpoint_name(n): (n, tuple(t.shape)) for n, t in names.items()}


HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]  # weights, configs, tokenizer: never code


def resolve_model_dir(model: str | os.PathLike, offline: bool = False) -> Path:
    """A local directory, or a Hugging Face repo id ("org/name") fetched with huggingface_hub into the standard HF
    cache: safetensors, JSON configs and the tokenizer only, never code (with a progress bar). `offline`: use the
    cache only, never the network."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"model path {path} is not a directory")
    name = str(model)
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or any(not part for part in name.split("/")):
        raise CheckpointError(f"model directory {path} does not exist (and {name!r} is not a hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{name!r} is not a local directory; to download it from the hub: pip install huggingface_hub"
        ) from None
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - the hub raises many types (not found, gated, offline, network)
        where = "in the local cache (--offline)" if offline else "on the hub"
        raise CheckpointError(f"cannot get {name!r} {where}: {type(e).__name__}: {e}") from None


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a directory, each checked to lie inside it."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in model_dir.glob("model-*.safetensors"))
    if not files:
        pickles = [p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickles:
            raise CheckpointError(
                f"{model_dir} holds only pickle-based weights ({', '.join(pickles[:3])}); these are never loaded "
                "because unpickling can run code. Convert them to safetensors."
            )
        raise CheckpointError(f"{model_dir} has no model.safetensors or model-*.safetensors shards")
    root = model_dir.resolve()
    paths = []
    for name in files:
        p = (model_dir / str(name)).resolve()
        if root not in p.parents:
            raise CheckpointError(f"shard path {name!r} escapes the model directory")
        if not p.is_file():
            raise CheckpointError(f"shard {name} listed by the index is missing")
        paths.append(p)
    return paths


def read_header(path: Path) -> dict[str, dict]:
    """Parse and validate one safetensors header without trusting it (offsets, sizes, dtypes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: file too small to be safetensors ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or n + 8 > size:
            raise CheckpointError(f"{path.name}: header length {n} is invalid for a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path.name}: header is not valid UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: header is not a JSON object")
    header.pop("__metadata__", None)
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            count = 1
            for s in shape:
                count *= int(s)
            ok = dtype in ITEM_SIZES and 0 <= start <= end and end - start == count * ITEM_SIZES[dtype]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path.name}: tensor {name!r} has an invalid dtype/shape/offset entry")
        spans.append((start, end))
    spans.sort()
    cursor = 0
    for start, end in spans:
        if start != cursor:
            raise CheckpointError(f"{path.name}: tensor data overlaps or leaves gaps at byte {start}")
        cursor = end
    if 8 + n + cursor != size:
        raise CheckpointError(f"{path.name}: expected {8 + n + cursor} bytes, found {size} (truncated or padded file)")
    return header


def quantizable(name: str) -> bool:
    """Whether a model tensor may be stored quantized: the linears, experts and embedding (`quantize.quant_target`),
    never the router, norms or scalars."""
    weights = ("_proj.weight", "experts.gate_up_proj", "experts.down_proj", "embed_tokens.weight")
    return name.endswith(weights) and not name.endswith("router.proj.weight")


def check_tensors(expected: dict, entries: dict, dtype_name: str | None) -> None:
    """Raise with the first mismatches if names, logical shapes or float dtypes differ from what the config implies
    (`entries`: checkpoint key -> `Entry`; quantized entries carry their own layout, checked by `plan_tensors`)."""
    missing = sorted(set(expected) - set(entries))
    unexpected = sorted(
        k for k in set(entries) - set(expected) if not k.startswith(SKIPPED_PREFIXES) and k != "lm_head.weight"
    )
    wrong = []
    for key in sorted(set(expected) & set(entries)):
        entry = entries[key]
        if tuple(entry.shape) != expected[key][1]:
            wrong.append(f"{key}: shape {list(entry.shape)} but config implies {list(expected[key][1])}")
        elif entry.spec is None and (
            entry.dtype not in DTYPES or (dtype_name is not None and entry.dtype != dtype_name)
        ):
            wrong.append(f"{key}: dtype {entry.dtype}, expected {dtype_name or 'a float type'}")
        elif entry.spec is not None and not quantizable(expected[key][0]):
            wrong.append(f"{key}: quantized ({entry.spec.kind}), but dgemma keeps this tensor in float")
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mismatched", wrong)):
        if items:
            problems.append(f"{len(items)} {label}: {'; '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
    if problems:
        raise CheckpointError("checkpoint does not match config.json: " + " | ".join(problems))


FINITE_CHECK_BYTES = 2 << 30  # `check_finite=None`: scan checkpoints up to this size for NaN/Inf
PACKED_SUFFIXES = ("_scale", "_zero", "_global")  # dgemma's own quantized layout (`quantize.Packed.tensors`)


@dataclasses.dataclass
class Entry:
    """One model tensor as a checkpoint stores it: float (`dtype` its safetensors dtype) or quantized (`spec`),
    with its logical shape and the stored tensors it is built from."""

    shape: tuple[int, ...]
    sources: list[str]
    dtype: str | None = None
    spec: QuantSpec | None = None
    fmt: str | None = None  # a `prequant` format whose `assemble` builds it; None: dgemma's own layout


def plan_tensors(model_dir: Path, raw_config: dict, found: dict[str, tuple[str, list, Path]]) -> dict[str, Entry]:
    """checkpoint key -> Entry, for dgemma's float and quantized layouts and the pre-quantized NVFP4/FP8 ones."""
    method = (raw_config.get("quantization_config") or {}).get("quant_method")
    fmt = None if method == "dgemma" else prequant.detect(model_dir, raw_config)
    if fmt is not None:
        out = {}
        for key, (kind, shape, sources) in prequant.plan(fmt, found).items():
            if kind == "float":
                out[key] = Entry(tuple(shape), sources, dtype=found[sources[0]][0], fmt=fmt)
            else:
                groups = next((found[s][1] or [1])[-1] for s in sources if s.endswith("weight_scale"))  # [] = 1
                out[key] = Entry(tuple(shape), sources, spec=_spec(kind, shape[-1], groups), fmt=fmt)
        return out
    out = {}
    for key, (dtype, shape, _) in found.items():
        base = next((key[: -len(x)] for x in PACKED_SUFFIXES if key.endswith(x) and key[: -len(x)] in found), None)
        if base is not None:
            continue  # read with its weight
        if key + "_scale" not in found:
            out[key] = Entry(tuple(shape), [key], dtype=dtype)
            continue
        out[key] = _native_entry(key, dtype, shape, found)
    return out


SCALE_DTYPES = ("F32", "BF16", "F16")


def _native_entry(key: str, dtype: str, shape: list, found: dict) -> Entry:
    """A weight in dgemma's own quantized layout (`quantize.QuantSpec.tensors`): the codes' dtype says the kind
    (U8 with a `_zero`: int4; U8 with a `_global`: nvfp4), the scale's last dim the group; then every companion
    tensor's dtype and shape are checked, and none may be left over."""
    scale = found[key + "_scale"]
    if len(shape) < 2 or len(scale[1]) != len(shape):
        raise CheckpointError(f"{key}: a quantized weight needs >= 2 dims and a scale of as many ({shape}, {scale[1]})")
    kinds = {"I8": "int8", "F8_E4M3": "fp8", "U8": "int4" if key + "_zero" in found else "nvfp4"}
    if dtype not in kinds:
        raise CheckpointError(f"{key}: quantized weight of dtype {dtype}; expected I8, U8 or F8_E4M3")
    kind = kinds[dtype]
    logical = (*shape[:-1], shape[-1] * (2 if dtype == "U8" else 1))
    spec = _spec(kind, logical[-1], scale[1][-1])
    layout = spec.tensors(logical)
    for suffix, (want_dtype, want_shape) in layout.items():
        got = found.get(key + suffix)
        dtype_ok = got is not None and (got[0] == want_dtype if suffix == "" else got[0] in _scale_dtypes(want_dtype))
        if not dtype_ok or tuple(got[1]) != want_shape:
            have = f"{got[0]} {list(got[1])}" if got else "missing"
            raise CheckpointError(
                f"{key + suffix}: {have}, but a {kind} weight {list(logical)} needs {want_dtype} {list(want_shape)}"
            )
    extra = [key + x for x in PACKED_SUFFIXES if key + x in found and x not in layout]
    if extra:
        raise CheckpointError(f"{extra[0]}: not part of a {kind} weight's layout")
    return Entry(logical, [key + x for x in layout], spec=spec)


def _scale_dtypes(want: str) -> tuple[str, ...]:
    return SCALE_DTYPES if want in SCALE_DTYPES else (want,)  # float scales in any float dtype; fp8 ones exactly


def _spec(kind: str, k: int, groups: int) -> QuantSpec:
    if groups <= 0 or k % groups:
        raise CheckpointError(f"a {kind} weight with {k} inputs cannot have {groups} scale groups per row")
    per_row = groups == 1 and kind in ("int8", "fp8")
    return QuantSpec(kind, None if per_row else k // groups)


def load_model(
    model_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    check_finite: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    execution: Execution = DEFAULT_EXECUTION,
) -> DiffusionGemma:
    """Build on the meta device, validate every tensor, then assign memory-mapped tensors (cast once if needed).
    Quantized checkpoints (dgemma's own int8/int4, ModelOpt NVFP4, compressed-tensors FP8) get their quantized
    modules swapped in first (`quantize.swap_modules`); their codes and scales are kept, never dequantized.
    `execution`: the model's kernels and batch invariance (`model.Execution`), fixed here.
    `check_finite`: warn about NaN/Inf weights (a full pass over the weights; None = only up to 2 GiB).
    `progress(done_bytes, total_bytes)` is called after each tensor (the CLI draws a bar for big checkpoints)."""
    model_dir = resolve_model_dir(model_dir)
    gguf_file = None if _has_safetensors(model_dir) else gguf_import.gguf_path(model_dir)
    config_path = model_dir / "config.json"
    if config_path.is_file():
        raw_config = read_json(config_path)
    elif gguf_file is not None:
        raw_config = gguf_import.gguf_config(gguf_file)
    else:
        raise CheckpointError(f"{model_dir} has no config.json")
    if raw_config.get("auto_map"):
        log.warning("config.json has auto_map (remote code); it is ignored, dgemma never imports model-dir code")
    config = ModelConfig.from_dict(raw_config)
    with torch.device("meta"), _skip_weight_init():
        model = DiffusionGemma(config, execution)
    expected = expected_tensors(model)
    if gguf_file is not None:
        entries, declared = _plan_gguf(gguf_file, expected), None
    else:
        found = safetensors_table(model_dir)
        entries = plan_tensors(model_dir, raw_config, found)
        declared = DTYPE_NAMES.get(raw_config.get("dtype") or raw_config.get("torch_dtype") or "")
    check_tensors(expected, entries, declared)
    target = dtype or DTYPES[entries[checkpoint_name("norm.weight")].dtype]
    plan = {expected[k][0]: e.spec for k, e in entries.items() if k in expected}
    if any(plan.values()):
        with torch.device("meta"):
            swap_modules(model, plan)

    def put_packed(name: str, p: Packed) -> None:  # converted at once: no second copy of the model is ever held
        owner, _, attr = name.rpartition(".")
        getattr(model.get_submodule(owner), attr).load(p, target, device)

    if gguf_file is not None:
        state = _read_gguf(gguf_file, expected, entries, target, device, progress, put_packed)
    else:
        state = _read_tensors(entries, expected, found, target, device, progress, put_packed)
    model.load_state_dict(state, strict=False, assign=True)
    _materialise_rope(model, device)
    if check_finite or (check_finite is None and sum(t.nbytes for t in state.values()) <= FINITE_CHECK_BYTES):
        _warn_non_finite(state)
    return model.eval().requires_grad_(False)  # inference: no autograd graph is ever built or kept


def _has_safetensors(model_dir: Path) -> bool:
    names = ("model.safetensors", "model.safetensors.index.json")
    return any((model_dir / n).exists() for n in names) or any(model_dir.glob("model-*.safetensors"))


def safetensors_table(model_dir: Path) -> dict[str, tuple[str, list, Path]]:
    """checkpoint key -> (dtype, shape, shard) from every validated shard header."""
    found: dict[str, tuple[str, list, Path]] = {}
    for path in weight_files(model_dir):
        for name, info in read_header(path).items():
            if name in found:
                raise CheckpointError(f"tensor {name!r} appears in two shards ({found[name][2].name}, {path.name})")
            found[name] = (info["dtype"], info["shape"], path)
    _check_index(model_dir, found)
    return found


def _plan_gguf(path: Path, expected: dict) -> dict[str, Entry]:
    """Entries of a GGUF file: its block types' lossless packed forms where dgemma quantizes the tensor, float
    (dequantized at load) everywhere else."""
    entries = {}
    for key, (type_name, shape) in gguf_import.gguf_header(path).items():
        spec = gguf_import.gguf_spec(type_name, shape)
        if spec is not None and key in expected and not quantizable(expected[key][0]):
            spec = None
        dtype = type_name if type_name in DTYPES else "F32"
        entries[key] = Entry(tuple(shape), [key], dtype=None if spec else dtype, spec=spec)
    return entries


def _read_gguf(path: Path, expected, entries, target, device, progress, put_packed):
    state, total = {}, len(entries)
    for done, (key, value) in enumerate(gguf_import.gguf_tensors(path, target), 1):
        if key in expected:
            name = expected[key][0]
            if isinstance(value, Packed) and entries[key].spec is None:
                value = value.dequantize(target)
            if isinstance(value, Packed):
                put_packed(name, value)
            else:
                state[name] = value.to(device=device, dtype=target)
        if progress is not None:
            progress(done, total)
    return state


def _read_tensors(entries, expected, found, target, device, progress, put_packed):
    """Read every expected entry shard by shard: float tensors cast to `target`, quantized ones as `Packed`
    (codes kept, scales fp32; their module converts them to its kernel's layout)."""
    by_file: dict[Path, list[str]] = {}
    for key in expected:
        by_file.setdefault(found[entries[key].sources[0]][2], []).append(key)
    total = sum(_nbytes(found[s]) for k in expected for s in entries[k].sources)
    done, state = 0, {}
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}

        def get(key: str) -> torch.Tensor:
            path = found[key][2]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            return handles[path].get_tensor(key)

        for keys in by_file.values():
            for key in keys:
                entry, name = entries[key], expected[key][0]
                if entry.spec is None and len(entry.sources) == 1:
                    state[name] = get(key).to(device=device, dtype=target)
                else:
                    value = _assemble(key, entry, get, found)
                    if isinstance(value, torch.Tensor):
                        state[name] = value.to(device=device, dtype=target)
                    else:
                        put_packed(name, value)
                done += sum(_nbytes(found[s]) for s in entry.sources)
                if progress is not None:
                    progress(done, total)
    return state


def _assemble(key: str, entry: Entry, get, found) -> torch.Tensor | Packed:
    sources = {s: get(s) for s in entry.sources}
    if entry.fmt is not None:
        return prequant.assemble(key, entry.spec.kind if entry.spec else "float", sources)
    t = {s[len(key) :]: v for s, v in sources.items()}
    return Packed(entry.spec.kind, t[""], t["_scale"].float(), t.get("_zero"), t.get("_global"))


def _nbytes(info: tuple) -> int:
    return math.prod(info[1]) * ITEM_SIZES[info[0]]


@contextlib.contextmanager
def _skip_weight_init():
    """Meta parameters are replaced by the checkpoint's, so nn.init has nothing to do; on meta tensors it would
    import torch's compiler stack just to run its decompositions (measured: 1.5-1.9 s of every start-up)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def load_generation_settings(model_dir: str | os.PathLike) -> GenerationSettings:
    return GenerationSettings.from_file(Path(model_dir) / "generation_config.json")


def _check_index(model_dir: Path, found: dict) -> None:
    index = model_dir / "model.safetensors.index.json"
    if not index.exists():
        return
    weight_map = read_json(index)["weight_map"]
    for name, shard in weight_map.items():
        if name not in found:
            raise CheckpointError(f"index lists {name!r} in {shard} but no shard holds it")
        if found[name][2].name != Path(shard).name:
            raise CheckpointError(f"index puts {name!r} in {shard} but it is in {found[name][2].name}")


def _materialise_rope(model: DiffusionGemma, device) -> None:
    """Non-persistent RoPE buffers were built on meta; recompute them on the real device."""
    from .model import rope_inv_freq

    text = model.text
    for i, g in enumerate(text.layers):
        setattr(model, f"inv_freq_{i}", rope_inv_freq(g, text.rope_parameters[g.layer_type]).to(device))


def _warn_non_finite(state: dict[str, torch.Tensor]) -> None:
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        log.warning("checkpoint holds NaN/Inf values in %d tensors, e.g. %s", len(bad), bad[:3])


__all__ = ["CheckpointError", "ConfigError", "load_generation_settings", "load_model", "resolve_model_dir"]
