"""Load a DiffusionGemma checkpoint directory into `DiffusionGemma` (spec section b).

Safetensors only: every shard header is validated by hand (size, JSON, dtypes, integer dims and offsets inside the
file, no gaps, overlaps or duplicate names) before the file is memory-mapped, and every tensor name/shape/dtype is
checked against what `config.json` implies. Every file is read through `config.check_file` (regular, inside the
directory, size-capped), config values are bounded before the meta model is built, and every failure is a
`CheckpointError` or `ConfigError` naming the file (scripts/fuzz_loader.py holds the loader to that). Vision-tower tensors are skipped. Nothing in the directory is ever executed: no pickle, no `auto_map`, no
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
from safetensors import SafetensorError, safe_open

from . import gguf_import, prequant
from .config import (
    CheckpointError,
    ConfigError,
    GenerationSettings,
    ModelConfig,
    check_file,
    read_json,
    reject_constant,
)
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
MAX_INDEX_BYTES = 64 << 20  # an index names every stored tensor: per-expert NVFP4 indexes of big MoEs run to MBs
HEADER_KEYS = {"dtype", "shape", "data_offsets"}
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
    """The safetensors shards of a directory, each checked to be a regular file inside it (`config.check_file`)."""
    index = model_dir / "model.safetensors.index.json"
    if os.path.lexists(index):
        files = sorted(set(_weight_map(model_dir).values()))
    elif os.path.lexists(model_dir / "model.safetensors"):
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
    paths = []
    for name in files:
        p = model_dir / name
        if not os.path.lexists(p):
            raise CheckpointError(f"shard {name} listed by the index is missing")
        check_file(p, root=model_dir)
        paths.append(p)  # its own name, not the link target's (HF cache blobs are named by hash)
    return paths


def _weight_map(model_dir: Path) -> dict[str, str]:
    """The index's weight_map, checked: tensor name -> a plain file name inside the directory."""
    index = model_dir / "model.safetensors.index.json"
    weight_map = read_json(index, MAX_INDEX_BYTES).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index}: weight_map[{name!r}] must be a shard file name, got {repr(shard)[:60]}")
        if Path(shard).is_absolute() or ".." in Path(shard).parts or Path(shard).name != shard:
            raise CheckpointError(f"{index}: shard path {shard!r} escapes the model directory")
    return weight_map


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
    header = _parse_header(path, raw)
    spans = []
    for name, info in header.items():
        if (span := _span(info)) is None:
            raise CheckpointError(f"{path.name}: tensor {name!r} has an invalid dtype/shape/offset entry")
        spans.append(span)
    spans.sort()
    cursor = 0
    for start, end in spans:
        if start != cursor:
            raise CheckpointError(f"{path.name}: tensor data overlaps or leaves gaps at byte {start}")
        cursor = end
    if 8 + n + cursor != size:
        raise CheckpointError(f"{path.name}: expected {8 + n + cursor} bytes, found {size} (truncated or padded file)")
    return header


def _parse_header(path: Path, raw: bytes) -> dict[str, dict]:
    """The header's JSON object, without `__metadata__` (null, or strings to strings, as the format says);
    duplicate names are refused (JSON would keep the last silently)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=reject_constant)
    except _Duplicate as e:
        raise CheckpointError(f"{path.name}: header names {e.args[0]!r} twice") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path.name}: header is not valid UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path.name}: header __metadata__ must map strings to strings")
    return header


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _span(info) -> tuple[int, int] | None:
    """(start, end) of a well-formed entry: known dtype, a list of integer dims >= 0, two integer offsets whose
    distance is exactly the tensor's byte size; None otherwise."""
    if not isinstance(info, dict) or not HEADER_KEYS <= set(info):  # other keys are ignored, as safetensors does
        return None
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEM_SIZES or not isinstance(shape, list):
        return None
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in (*shape, *offsets)):
        return None
    start, end = offsets
    return (start, end) if start <= end and end - start == math.prod(shape) * ITEM_SIZES[dtype] else None


def _is_count(x) -> bool:
    return type(x) is int and x >= 0


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
    qc = raw_config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError("config.json quantization_config must be a JSON object")
    method = (qc or {}).get("quant_method")
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
    gguf_file, raw_config = _raw_config(model_dir)
    if raw_config.get("auto_map"):
        log.warning("config.json has auto_map (remote code); it is ignored, dgemma never imports model-dir code")
    config = _model_config(model_dir, raw_config, gguf_file)
    with torch.device("meta"), _skip_weight_init():
        model = DiffusionGemma(config, execution)
    expected = expected_tensors(model)
    if gguf_file is not None:
        entries, declared = _plan_gguf(gguf_file, expected), None
    else:
        found = safetensors_table(model_dir)
        entries = plan_tensors(model_dir, raw_config, found)
        declared = _declared_dtype(raw_config)
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


def _declared_dtype(raw_config: dict) -> str | None:
    """The safetensors dtype config.json declares (`dtype`, or the older `torch_dtype`), or None."""
    name = raw_config.get("dtype") or raw_config.get("torch_dtype")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"config.json dtype must be a string like 'bfloat16', got {repr(name)[:60]}")
    return DTYPE_NAMES.get(name or "")


def _raw_config(model_dir: Path) -> tuple[Path | None, dict]:
    """(the GGUF file, or None for safetensors; the config.json dict, or one rebuilt from GGUF metadata)."""
    gguf_file = None if _has_safetensors(model_dir) else gguf_import.gguf_path(model_dir)
    config_path = model_dir / "config.json"
    if os.path.lexists(config_path):
        return gguf_file, read_json(config_path)
    if gguf_file is not None:
        return gguf_file, gguf_import.gguf_config(gguf_file)
    raise CheckpointError(f"{model_dir} has no config.json")


def _model_config(model_dir: Path, raw_config: dict, gguf_file: Path | None) -> ModelConfig:
    """`ModelConfig.from_dict`, its errors naming where the values came from."""
    try:
        return ModelConfig.from_dict(raw_config)
    except ConfigError as e:
        config_json = model_dir / "config.json"
        source = config_json if gguf_file is None or os.path.lexists(config_json) else f"{gguf_file} metadata"
        raise ConfigError(f"{source}: {e}") from None


def _has_safetensors(model_dir: Path) -> bool:
    names = ("model.safetensors", "model.safetensors.index.json")
    return any(os.path.lexists(model_dir / n) for n in names) or any(model_dir.glob("model-*.safetensors"))


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
            try:
                if path not in handles:
                    handles[path] = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                return handles[path].get_tensor(key)
            except (SafetensorError, OSError) as e:  # a header the library reads differently from read_header
                raise CheckpointError(f"{path.name}: tensor {key!r} cannot be read: {e}") from None

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
    """The checkpoint's generation_config.json (defaults where it has none), its token ids checked against the
    vocabulary of config.json (or of the GGUF metadata)."""
    model_dir = Path(model_dir)
    settings = GenerationSettings.from_file(model_dir / "generation_config.json")
    ids = [*settings.eos_token_ids, *([settings.pad_token_id] if settings.pad_token_id is not None else [])]
    if ids:
        gguf_file, raw_config = _raw_config(model_dir)
        vocab = _model_config(model_dir, raw_config, gguf_file).text.vocab_size
        if bad := [i for i in ids if i >= vocab]:
            raise ConfigError(f"generation_config.json: token id {bad[0]} is outside the vocabulary ({vocab})")
    return settings


def _check_index(model_dir: Path, found: dict) -> None:
    if not os.path.lexists(model_dir / "model.safetensors.index.json"):
        return
    for name, shard in _weight_map(model_dir).items():
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
