"""Architecture config and sampling settings, read from a checkpoint's JSON files (spec section a).

`ModelConfig` mirrors `config.json` (HF field names, unknown keys ignored, invariants checked before anything is
allocated). `GenerationSettings` mirrors `generation_config.json` plus per-call overrides. This module reads JSON
only; it never imports torch and never looks at weights. `read_file` / `check_file` are the one way the loader reads a
checkpoint's small files: regular files only (no FIFOs or devices), inside the model directory (symlinks may not
escape it), each under a size cap; `read_json` also bounds nesting and refuses NaN / Infinity.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)
SUPPORTED_ROPE_TYPES = ("default", "proportional")
MAX_VOCAB = 1 << 22  # far above any real vocabulary; rejects absurd configs before allocation
# Bounds on config values, checked before anything is built (each far above any real checkpoint's): the meta model
# has one module per layer and expert, RoPE tables are built from head_dim, caches from the windows and the context.
LIMITS = {
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "moe_intermediate_size": 1 << 18,
    "num_experts": 1 << 12,
    "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 10,
    "head_dim": 1 << 12,
    "num_key_value_heads": 1 << 10,
    "max_position_embeddings": 1 << 22,
    "sliding_window": 1 << 22,
    "canvas_length": 1 << 12,
}
GENERATION_LIMITS = {"max_new_tokens": 1 << 22, "max_denoising_steps": 1 << 14, "stability_threshold": 1 << 14}
MAX_CONFIG_BYTES = 1 << 20  # config.json, generation_config.json, hf_quant_config.json
MAX_JSON_DEPTH = 64  # real configs nest 4-6 deep; json.loads itself recurses (RecursionError) past ~1000
DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


# The text config of google/diffusiongemma-26B-A4B-it (spec a.2), for benchmarks and memory projections that build
# its shapes without the checkpoint; layer_types / num_hidden_layers are left to the caller.
DIFFUSIONGEMMA_26B_TEXT = {
    "vocab_size": 262144,
    "hidden_size": 2816,
    "intermediate_size": 2112,
    "moe_intermediate_size": 704,
    "num_experts": 128,
    "top_k_experts": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "global_head_dim": 512,
    "num_global_key_value_heads": 2,
    "sliding_window": 1024,
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "use_bidirectional_attention": "vision",
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
}


class ConfigError(ValueError):
    """A config.json / generation_config.json value that dgemma cannot use."""


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded safely (weights, their headers, layout or format)."""


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
    """Attention shape of one layer (sliding and full layers differ, spec a.2)."""

    layer_type: str
    head_dim: int
    num_kv_heads: int

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """`text_config` of a DiffusionGemma checkpoint (spec a.2)."""

    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    moe_intermediate_size: int = 0
    num_experts: int = 0
    top_k_experts: int = 0
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    layers: tuple[LayerGeometry, ...] = ()
    sliding_window: int = 512
    rope_parameters: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_ROPE))
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2

    @property
    def layer_types(self) -> list[str]:
        return [g.layer_type for g in self.layers]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        """Build from HF `text_config`, accepting both `per_layer_config` and `global_head_dim` spellings."""
        n_layers = _positive_int(d, "num_hidden_layers", 30)
        _check_limit("num_hidden_layers", n_layers)  # before a list of that many layer types is built
        layer_types = d.get("layer_types") or _default_layer_types(n_layers)
        if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
            raise ConfigError(f"layer_types must be a list of strings, got {_short(layer_types)}")
        layer_types = list(layer_types)
        if len(layer_types) != n_layers:
            raise ConfigError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {n_layers}")
        if bad := sorted(set(layer_types) - {SLIDING, FULL}):
            raise ConfigError(f"unsupported layer_types {bad}; expected {SLIDING!r} or {FULL!r}")
        layer_types[-1] = FULL  # the reference forces the last layer to full attention
        layers = _layer_geometry(d, layer_types)
        cfg = cls(
            vocab_size=_positive_int(d, "vocab_size", 262_144),
            hidden_size=_positive_int(d, "hidden_size", 2304),
            intermediate_size=_positive_int(d, "intermediate_size", 9216),
            moe_intermediate_size=_positive_int(d, "moe_intermediate_size", None),
            num_experts=_positive_int(d, "num_experts", None),
            top_k_experts=_positive_int(d, "top_k_experts", None),
            num_hidden_layers=n_layers,
            num_attention_heads=_positive_int(d, "num_attention_heads", 8),
            layers=layers,
            sliding_window=_positive_int(d, "sliding_window", 512),
            rope_parameters=_rope_parameters(d.get("rope_parameters")),
            max_position_embeddings=_positive_int(d, "max_position_embeddings", 131_072),
            rms_norm_eps=_positive_float(d, "rms_norm_eps", 1e-6),
            final_logit_softcapping=_positive_float(d, "final_logit_softcapping", 30.0, optional=True),
            pad_token_id=_token_id(d, "pad_token_id", 0),
            eos_token_id=d.get("eos_token_id", 1),
            bos_token_id=_token_id(d, "bos_token_id", 2),
        )
        cfg._check(d)
        return cfg

    def _check(self, d: dict[str, Any]) -> None:
        if self.vocab_size > MAX_VOCAB:
            raise ConfigError(f"vocab_size {self.vocab_size} exceeds the supported maximum {MAX_VOCAB}")
        for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_experts", "num_hidden_layers"):
            _check_limit(key, getattr(self, key))
        for key in ("num_attention_heads", "max_position_embeddings", "sliding_window"):
            _check_limit(key, getattr(self, key))
        for g in self.layers:
            _check_limit("head_dim", g.head_dim)
            _check_limit("num_key_value_heads", g.num_kv_heads)
        for key in ("pad_token_id", "bos_token_id"):
            _check_ids(key, [getattr(self, key)] if getattr(self, key) is not None else [], self.vocab_size)
        _check_ids("text_config.eos_token_id", _id_list(self.eos_token_id, "text_config.eos_token_id"), self.vocab_size)
        if self.top_k_experts > self.num_experts:
            raise ConfigError(f"top_k_experts {self.top_k_experts} > num_experts {self.num_experts}")
        for i, g in enumerate(self.layers):
            if self.num_attention_heads % g.num_kv_heads:
                raise ConfigError(f"layer {i}: {self.num_attention_heads} heads not divisible by {g.num_kv_heads}")
            if g.head_dim % 2:
                raise ConfigError(f"layer {i}: head_dim {g.head_dim} must be even for RoPE")
        if (act := d.get("hidden_activation", "gelu_pytorch_tanh")) not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_activation {act!r} is not supported (expected gelu_pytorch_tanh)")
        if d.get("attention_bias"):
            raise ConfigError("attention_bias=true is not part of the DiffusionGemma architecture")
        if d.get("use_bidirectional_attention") == "all":
            raise ConfigError("use_bidirectional_attention='all' (non-causal encoder) is not supported")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Top-level `config.json` (`model_type: diffusion_gemma`)."""

    text: TextConfig
    canvas_length: int = 256
    eos_token_id: list[int] = dataclasses.field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        if (mt := d.get("model_type")) not in (None, "diffusion_gemma"):
            raise ConfigError(f"model_type {mt!r} is not a DiffusionGemma checkpoint (expected 'diffusion_gemma')")
        if not isinstance(d.get("text_config"), dict):
            raise ConfigError("config.json has no 'text_config' object")
        if d.get("tie_word_embeddings") is False or d["text_config"].get("tie_word_embeddings") is False:
            raise ConfigError(
                "untied checkpoints (tie_word_embeddings=false: separate encoder weights and LM head) are not supported"
            )
        text = TextConfig.from_dict(d["text_config"])
        eos = _id_list(d.get("eos_token_id", text.eos_token_id), "eos_token_id")
        _check_ids("eos_token_id", eos, text.vocab_size)
        canvas = _positive_int(d, "canvas_length", 256)
        _check_limit("canvas_length", canvas)
        if canvas > text.max_position_embeddings:
            raise ConfigError(f"canvas_length {canvas} exceeds max_position_embeddings {text.max_position_embeddings}")
        return cls(text=text, canvas_length=canvas, eos_token_id=eos)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_json(path))


def _knob(default, kind: str, help: str, per_request: bool = True):
    """A GenerationSettings field that front ends expose: `kind` names the CLI value type, `per_request` whether
    HTTP bodies may set it (the CLI exposes every knob). The one list every front end derives its flags from."""
    return dataclasses.field(default=default, metadata={"kind": kind, "help": help, "per_request": per_request})


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Sampling knobs (spec a.3 / d.1): checkpoint `generation_config.json` + per-call overrides."""

    max_new_tokens: int = _knob(
        256, "positive_int", "exact token budget (canvases are rounded up, output is not)", per_request=False
    )
    steps: int = _knob(48, "positive_int", "max denoising steps per canvas")  # max_denoising_steps
    entropy_bound: float = _knob(0.1, "positive_float", "entropy budget for acceptance")
    t_min: float = _knob(0.4, "non_negative_float", "temperature at the last step")
    t_max: float = _knob(0.8, "non_negative_float", "temperature at the first step")
    stability_threshold: int = _knob(1, "non_negative_int", "stable steps to stop")
    confidence_threshold: float = _knob(0.005, "positive_float", "mean entropy to stop")
    eos_token_ids: tuple[int, ...] = _knob((), "id_list", "stop token ids, e.g. 1,106", per_request=False)
    # not read from generation_config.json: the reference ignores temperature/top_p there (spec d.2); per call only
    temperature: float = _knob(1.0, "non_negative_float", "scales the t_min..t_max schedule; 0: argmax samples")
    top_p: float = _knob(1.0, "positive_float", "nucleus cut of each position's sample (<= 1)")
    # fast mode (opt-in approximations; 0 = exact, the reference's semantics)
    sc_top_k: int = _knob(0, "non_negative_int", "fast: self-conditioning from each position's top-k probabilities")
    sparse_sampling: int = _knob(0, "non_negative_int", "fast: 1 samples only the positions acceptance keeps")
    empty_redraws: int = _knob(
        0, "non_negative_int", "re-draws of a first canvas that starts with EOS (0: off, as the reference)"
    )
    pad_token_id: int | None = None

    @classmethod
    def knobs(cls, per_request: bool = False) -> list[dataclasses.Field]:
        """The fields front ends expose (only those HTTP bodies may set, with `per_request`)."""
        return [f for f in dataclasses.fields(cls) if f.metadata and (f.metadata["per_request"] or not per_request)]

    def __post_init__(self) -> None:
        _check_int(self.max_new_tokens, "max_new_tokens", 1)
        _check_int(self.steps, "steps", 1)
        _check_int(self.stability_threshold, "stability_threshold", 0)
        _check_int(self.empty_redraws, "empty_redraws", 0)
        _check_int(self.sc_top_k, "sc_top_k", 0)
        if self.sparse_sampling not in (0, 1) or isinstance(self.sparse_sampling, bool):
            raise ConfigError(f"sparse_sampling must be 0 or 1, got {self.sparse_sampling!r}")
        for name in ("entropy_bound", "t_min", "t_max", "confidence_threshold", "temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {v!r}")
        if self.entropy_bound <= 0 or self.confidence_threshold <= 0:
            raise ConfigError("entropy_bound and confidence_threshold must be > 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if not 0 <= self.t_min < self.t_max:
            raise ConfigError(f"need 0 <= t_min < t_max, got t_min={self.t_min} t_max={self.t_max}")
        for i in self.eos_token_ids:
            _check_int(i, "eos token id", 0)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> GenerationSettings:
        """Map HF generation_config keys; null or missing values fall back to the reference defaults."""
        d = d or {}
        if not isinstance(d, dict):
            raise ConfigError("generation settings must be a JSON object")
        for key, limit in GENERATION_LIMITS.items():
            if isinstance(d.get(key), int) and d[key] > limit:
                raise ConfigError(f"{key} = {d[key]} exceeds the supported maximum {limit}")
        if d.get("pad_token_id") is not None:
            _check_int(d["pad_token_id"], "pad_token_id", 0)
        sampler = d.get("sampler_config") or {}
        mapped = {
            "max_new_tokens": d.get("max_new_tokens"),
            "steps": d.get("max_denoising_steps"),
            "entropy_bound": sampler.get("entropy_bound") if isinstance(sampler, dict) else None,
            "t_min": d.get("t_min"),
            "t_max": d.get("t_max"),
            "stability_threshold": d.get("stability_threshold"),
            "confidence_threshold": d.get("confidence_threshold"),
            "eos_token_ids": tuple(_id_list(d.get("eos_token_id"), "eos_token_id")),
            "pad_token_id": d.get("pad_token_id"),
        }
        for name in ("entropy_bound", "t_min", "t_max", "confidence_threshold"):
            if type(mapped[name]) is int:  # JSON 1 or 10**40: the sampler takes floats (an int past 2**63 overflows)
                mapped[name] = float(mapped[name])
        return cls(**{k: v for k, v in mapped.items() if v is not None})

    @classmethod
    def from_file(cls, path: str | Path) -> GenerationSettings:
        """Settings from `path`, or the defaults when there is no such file (a FIFO or device there is refused)."""
        path = Path(path)
        data = read_json(path) if os.path.lexists(path) else None
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def override(self, **changes: Any) -> GenerationSettings:
        """A copy with the non-None `changes` applied (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown generation settings: {sorted(unknown)}")
        changes = {k: v for k, v in changes.items() if v is not None}
        if "eos_token_ids" in changes:
            changes["eos_token_ids"] = tuple(changes["eos_token_ids"])
        return dataclasses.replace(self, **changes)


def read_json(path: str | Path, max_bytes: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    """Read a JSON object from a regular file of at most `max_bytes` inside its directory (`read_file`), turning
    decode errors, non-standard constants (NaN, Infinity) and nesting beyond MAX_JSON_DEPTH into a ConfigError
    naming the file."""
    path = Path(path)
    data = read_file(path, max_bytes)
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=reject_constant)
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, over-long integers, NaN/Infinity
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    if _depth(value) > MAX_JSON_DEPTH:
        raise ConfigError(f"{path} is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return value


def read_file(path: str | Path, max_bytes: int, root: str | Path | None = None) -> bytes:
    """The bytes of `path`, checked by `check_file`; opened without blocking, so a FIFO swapped in after the
    check is still refused, and never more than `max_bytes + 1` bytes are read."""
    path = check_file(path, max_bytes, root)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise CheckpointError(f"{path} is not a regular file")
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise CheckpointError(f"{path} is larger than {max_bytes} bytes, the limit for this file")
    return data


def check_file(path: str | Path, max_bytes: int | None = None, root: str | Path | None = None) -> Path:
    """`path` resolved, if it is a regular file (not a FIFO, device or directory, also through symlinks) of at most
    `max_bytes` whose real path stays inside `root` (default: its own directory). A Hugging Face cache snapshot's
    symlinks into its repo's `blobs/` count as inside. Anything else raises CheckpointError."""
    path = Path(path)
    try:
        real = path.resolve(strict=True)
        info = real.stat()
    except (OSError, RuntimeError) as e:  # missing, dangling link, link loop (RuntimeError before 3.13)
        raise CheckpointError(f"{path} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file (a directory, FIFO or device); refusing to read it")
    if not _inside(real, Path(root) if root is not None else path.parent):
        raise CheckpointError(f"{path} is a symlink to {real}, outside the model directory; refusing to read it")
    if max_bytes is not None and info.st_size > max_bytes:
        raise CheckpointError(f"{path} is {info.st_size} bytes, over the {max_bytes}-byte limit for this file")
    return real


def _inside(real: Path, root: Path) -> bool:
    root = root.resolve()
    roots = [root]
    if root.parent.name == "snapshots":  # HF cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
        roots.append(root.parent.parent / "blobs")
    return any(r == real.parent or r in real.parents for r in roots)


def reject_constant(name: str):
    """`json.loads(parse_constant=...)`: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not a JSON value")


def _depth(value) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def _default_layer_types(n: int) -> list[str]:
    return [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]


def _layer_geometry(d: dict[str, Any], layer_types: list[str]) -> tuple[LayerGeometry, ...]:
    """Resolve head_dim / kv heads per layer from per_layer_config or the global_* keys (spec a.2)."""
    head_dim = _positive_int(d, "head_dim", 256)
    kv_heads = _positive_int(d, "num_key_value_heads", 4)
    overrides: dict[int, dict] = {}
    if "per_layer_config" in d and d["per_layer_config"] is not None:
        if not isinstance(d["per_layer_config"], dict):
            raise ConfigError(f"per_layer_config must be an object, got {_short(d['per_layer_config'])}")
        for key, value in d["per_layer_config"].items():
            if not isinstance(value, (dict, type(None))):
                raise ConfigError(f"per_layer_config[{key!r}] must be an object, got {_short(value)}")
            for i in _layer_targets(key, layer_types):
                overrides[i] = value or {}
    else:
        full = {"head_dim": d.get("global_head_dim") or 512}
        if d.get("num_global_key_value_heads") is not None:
            full["num_key_value_heads"] = d["num_global_key_value_heads"]
        overrides = {i: full for i, t in enumerate(layer_types) if t == FULL}
    out = []
    for i, t in enumerate(layer_types):
        o = overrides.get(i, {})
        hd, kv = o.get("head_dim", head_dim), o.get("num_key_value_heads", kv_heads)
        for name, v in (("head_dim", hd), ("num_key_value_heads", kv)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"layer {i}: {name} must be a positive integer, got {v!r}")
        out.append(LayerGeometry(t, hd, kv))
    return tuple(out)


def _layer_targets(key: str, layer_types: list[str]) -> list[int]:
    """The layers a per_layer_config key names: a layer type, or one layer index."""
    if key in (SLIDING, FULL):
        return [i for i, t in enumerate(layer_types) if t == key]
    if not key.isdigit() or not 0 <= int(key) < len(layer_types):
        raise ConfigError(f"per_layer_config names layer {key!r}, outside 0..{len(layer_types) - 1}")
    return [int(key)]


def _rope_parameters(rope: dict | None) -> dict:
    rope = rope or DEFAULT_ROPE
    if not isinstance(rope, dict):
        raise ConfigError(f"rope_parameters must be an object, got {_short(rope)}")
    out = {}
    for layer_type in (SLIDING, FULL):
        p = rope.get(layer_type) or DEFAULT_ROPE[layer_type]
        if not isinstance(p, dict):
            raise ConfigError(f"rope_parameters[{layer_type!r}] must be an object, got {_short(p)}")
        p = dict(p)
        for key, low, high in (("rope_theta", 0, math.inf), ("partial_rotary_factor", 0, 1), ("factor", 0, math.inf)):
            if key in p and not _in_range(p[key], low, high):
                raise ConfigError(f"rope_parameters[{layer_type!r}].{key} must be a number in ({low}, {high}]")
        if p.get("rope_type", "default") not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope_type {p.get('rope_type')!r} for {layer_type} is not supported")
        if p.get("rope_type", "default") == "default" and p.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("partial_rotary_factor is only supported with proportional RoPE")
        out[layer_type] = p
    return out


def _positive_int(d: dict[str, Any], key: str, default: int | None) -> int:
    v = d.get(key, default)
    if v is None:
        raise ConfigError(f"config is missing required key {key!r}")
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {v!r}")
    return v


def _positive_float(d: dict[str, Any], key: str, default: float | None, optional: bool = False) -> float | None:
    v = d.get(key, default)
    if v is None and optional:
        return None
    if not _in_range(v, 0, math.inf):
        raise ConfigError(f"{key} must be a positive finite number, got {_short(v)}")
    return float(v)


def _in_range(v: Any, low: float, high: float) -> bool:
    """`low < v <= high` for a finite real number (bools are not numbers here)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and low < v <= high


def _token_id(d: dict[str, Any], key: str, default: int | None) -> int | None:
    v = d.get(key, default)
    if v is not None:
        _check_int(v, key, 0)
    return v


def _check_ids(key: str, ids: list[int], vocab_size: int) -> None:
    if bad := [i for i in ids if i >= vocab_size]:
        raise ConfigError(f"{key} {bad[0]} is outside the vocabulary (vocab_size {vocab_size})")


def _check_limit(key: str, value: int) -> None:
    if value > LIMITS[key]:
        raise ConfigError(f"{key} = {value} exceeds the supported maximum {LIMITS[key]}")


def _short(v: Any) -> str:
    return repr(v)[:60]


def _check_int(v: Any, name: str, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {_short(v)}")


def _id_list(v: Any, key: str = "eos_token_id") -> list[int]:
    """One token id or a list of them, each an integer >= 0."""
    if v is None:
        return []
    ids = list(v) if isinstance(v, (list, tuple)) else [v]
    for i in ids:
        _check_int(i, key, 0)
    return ids
