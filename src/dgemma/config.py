"""Architecture config and sampling settings, read from a checkpoint's JSON files (spec section a).

`ModelConfig` mirrors `config.json` (HF field names, unknown keys ignored, invariants checked before anything is
allocated). `GenerationSettings` mirrors `generation_config.json` plus per-call overrides. This module reads JSON
only; it never imports torch and never looks at weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)
SUPPORTED_ROPE_TYPES = ("default", "proportional")
MAX_VOCAB = 1 << 22  # far above any real vocabulary; rejects absurd configs before allocation
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
        layer_types = list(d.get("layer_types") or _default_layer_types(n_layers))
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
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=d.get("final_logit_softcapping", 30.0),
            pad_token_id=d.get("pad_token_id", 0),
            eos_token_id=d.get("eos_token_id", 1),
            bos_token_id=d.get("bos_token_id", 2),
        )
        cfg._check(d)
        return cfg

    def _check(self, d: dict[str, Any]) -> None:
        if self.vocab_size > MAX_VOCAB:
            raise ConfigError(f"vocab_size {self.vocab_size} exceeds the supported maximum {MAX_VOCAB}")
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
        eos = d.get("eos_token_id", text.eos_token_id)
        return cls(text=text, canvas_length=_positive_int(d, "canvas_length", 256), eos_token_id=_id_list(eos))

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
        sampler = d.get("sampler_config") or {}
        mapped = {
            "max_new_tokens": d.get("max_new_tokens"),
            "steps": d.get("max_denoising_steps"),
            "entropy_bound": sampler.get("entropy_bound") if isinstance(sampler, dict) else None,
            "t_min": d.get("t_min"),
            "t_max": d.get("t_max"),
            "stability_threshold": d.get("stability_threshold"),
            "confidence_threshold": d.get("confidence_threshold"),
            "eos_token_ids": tuple(_id_list(d.get("eos_token_id"))),
            "pad_token_id": d.get("pad_token_id"),
        }
        return cls(**{k: v for k, v in mapped.items() if v is not None})

    @classmethod
    def from_file(cls, path: str | Path) -> GenerationSettings:
        path = Path(path)
        return cls.from_dict(read_json(path) if path.exists() else None)

    def override(self, **changes: Any) -> GenerationSettings:
        """A copy with the non-None `changes` applied (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown generation settings: {sorted(unknown)}")
        changes = {k: v for k, v in changes.items() if v is not None}
        if "eos_token_ids" in changes:
            changes["eos_token_ids"] = tuple(changes["eos_token_ids"])
        return dataclasses.replace(self, **changes)


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object, turning decode errors into a ConfigError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _default_layer_types(n: int) -> list[str]:
    return [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]


def _layer_geometry(d: dict[str, Any], layer_types: list[str]) -> tuple[LayerGeometry, ...]:
    """Resolve head_dim / kv heads per layer from per_layer_config or the global_* keys (spec a.2)."""
    head_dim = _positive_int(d, "head_dim", 256)
    kv_heads = _positive_int(d, "num_key_value_heads", 4)
    overrides: dict[int, dict] = {}
    if "per_layer_config" in d and d["per_layer_config"] is not None:
        for key, value in d["per_layer_config"].items():
            targets = [i for i, t in enumerate(layer_types) if t == key] if key in (SLIDING, FULL) else [int(key)]
            for i in targets:
                if not 0 <= i < len(layer_types):
                    raise ConfigError(f"per_layer_config names layer {i}, outside 0..{len(layer_types) - 1}")
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


def _rope_parameters(rope: dict | None) -> dict:
    rope = rope or DEFAULT_ROPE
    out = {}
    for layer_type in (SLIDING, FULL):
        p = dict(rope.get(layer_type) or DEFAULT_ROPE[layer_type])
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


def _check_int(v: Any, name: str, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {v!r}")


def _id_list(v: Any) -> list[int]:
    if v is None:
        return []
    return [v] if isinstance(v, int) else list(v)
