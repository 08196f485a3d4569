"""Loader fuzzer: mutated copies of small valid checkpoints in every format the loader reads, each loaded by
`Pipeline.load` and, if it loads, used for one short `generate`.

Formats (`build_bases`): the bundled model (float safetensors, configs, tokenizer, chat template), a sharded copy with
`model.safetensors.index.json`, dgemma's int4 layout, ModelOpt NVFP4, compressed-tensors FP8 and GGUF. Each case is a
seeded structured mutation (`MUTATIONS`: safetensors headers, lengths, offsets, dtypes and shapes, truncation and
padding, config / generation-config / tokenizer / template values and text, symlinks, FIFOs and devices, index
traversal, GGUF header fields) of a copy whose untouched files are hard links to the base.

Cases run in worker subprocesses (`--worker`) with an address-space cap (`RLIMIT_AS`: the warm worker's size plus
`--mem-mb`) and a wall-clock timeout per case. Outcome classes:
- `generated` (loaded, and a short generate ran), `refused` (CheckpointError / ConfigError at load),
  `refused_at_use` (a ConfigError from generate, e.g. a chat template its sandbox refuses);
- findings: `undocumented` (any other exception at load), `generate_failed` (loaded, then an exception other than
  ConfigError while generating), `memory` (an allocation over the cap), `hang` (over the timeout), `crash` (the worker
  died).

    python scripts/fuzz_loader.py --format all --cases 200 --seed 0
    python scripts/fuzz_loader.py --format bundled --minutes 10 --seed 1 --start 5000 --jobs 2

Prints a table, then one JSON line: outcome counts per format and examples of each finding class. Case `i` of a format
and seed is always the same mutation, so `--start` extends a campaign and `--replay FORMAT:SEED:I` reruns one case.
This script never edits the base checkpoints (mutated files are written fresh, never through a hard link).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "src" / "dgemma" / "bundled"
FORMATS = ("bundled", "sharded", "int4", "nvfp4", "fp8", "gguf")
FINDINGS = ("undocumented", "generate_failed", "memory", "hang", "crash")
OUTCOMES = ("generated", "refused", "refused_at_use", *FINDINGS)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
DEEP = "__DEEP__"


# ---- base checkpoints -------------------------------------------------------------------------------------------


def build_bases(root: Path, formats=FORMATS) -> dict[str, Path]:
    """One small valid checkpoint directory per format under `root` (built once per run)."""
    sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]
    import torch
    from tokenizers import Tokenizer

    from dgemma.loader import load_model

    torch.set_num_threads(1)
    model = load_model(BUNDLED)
    tok = Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))
    builders = {
        "bundled": lambda d: shutil.copytree(BUNDLED, d, ignore=shutil.ignore_patterns("*.png", "*.md")),
        "sharded": _sharded,
        "int4": _int4,
        "nvfp4": lambda d: _prequant(d, model, tok, "write_nvfp4"),
        "fp8": lambda d: _prequant(d, model, tok, "write_fp8"),
        "gguf": lambda d: _gguf(d, model),
    }
    out = {}
    for fmt in formats:
        out[fmt] = root / fmt
        if not out[fmt].is_dir():
            builders[fmt](out[fmt])
    return out


def _side_files(dst: Path) -> None:
    for name in SIDE_FILES:
        shutil.copyfile(BUNDLED / name, dst / name)


def _sharded(dst: Path) -> None:
    """The bundled model in three shards with an index."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(BUNDLED, dst, ignore=shutil.ignore_patterns("*.png", "*.md", "model.safetensors"))
    tensors = load_file(BUNDLED / "model.safetensors")
    keys = sorted(tensors)
    weight_map = {}
    for i in range(3):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {k: tensors[k] for k in keys[i::3]}
        save_file(part, str(dst / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _int4(dst: Path) -> None:
    from dgemma.export import quantize_checkpoint
    from dgemma.quantize import Scheme

    quantize_checkpoint(BUNDLED, dst, Scheme("int4", 32))


def _prequant(dst: Path, model, tok, writer: str) -> None:
    import prequant_fixtures

    getattr(prequant_fixtures, writer)(dst, model, tokenizer=tok)
    _side_files(dst)


def _gguf(dst: Path, model) -> None:
    from gguf import GGMLQuantizationType as Q
    from gguf_fixtures import write_gguf

    types = [Q.Q8_0, Q.Q4_0, Q.Q5_0]
    dst.mkdir(parents=True)
    write_gguf(
        dst / "model.gguf",
        model,
        lambda key: types[len(key) % 3] if key.endswith(("_proj.weight", "_proj")) else Q.F32,
    )
    _side_files(dst)


# ---- mutations --------------------------------------------------------------------------------------------------

EVIL = [
    None,
    True,
    False,
    0,
    -1,
    1,
    3,
    2**31 - 1,
    2**31,
    2**32,
    2**63,
    -(2**63),
    10**12,
    10**40,
    0.5,
    1.0,
    -1.5,
    1e308,
    -1e308,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "a",
    "x" * 5000,
    "\x00",
    "\ud800",
    "../../etc/passwd",
    [],
    [1],
    [-1, 2**40],
    [[1]],
    {},
    {"a": 1},
    DEEP,
]
CONFIG_TARGETS = {
    ("text_config", "head_dim"): [2**31, 2**20, 4096, 0, 3, 1.5, "32"],
    ("text_config", "per_layer_config", "2", "head_dim"): [2**31, 65536, 2, 1.0],
    ("text_config", "per_layer_config"): [{"99": {}}, {"x": {}}, [], "x", {"2": []}, {"2": {"head_dim": 2**31}}],
    ("text_config", "max_position_embeddings"): [10**12, 2**31, 2**63, 1, 16],
    ("text_config", "vocab_size"): [2**22, 2**40, 1, 3, 4095, 4097],
    ("text_config", "hidden_size"): [2**31, 2**20, 1, 7, 129],
    ("text_config", "intermediate_size"): [2**31, 2**24, 1],
    ("text_config", "moe_intermediate_size"): [2**31, 2**24, 1],
    ("text_config", "num_experts"): [2**20, 2**31, 1, 0, 5],
    ("text_config", "top_k_experts"): [5, 0, 2**31, 1],
    ("text_config", "num_hidden_layers"): [10**6, 2**31, 5, 3],
    ("text_config", "num_attention_heads"): [2**20, 3, 2**31, 8],
    ("text_config", "num_key_value_heads"): [2**20, 3, 0, 4],
    ("text_config", "sliding_window"): [2**31, 10**12, 1],
    ("canvas_length",): [2**31, 10**12, 1, 3, 7, 0, 10**6, 4096],
    ("eos_token_id",): [4096, 4097, 10**9, -1, [1, 10**9], [], [1.5], "1", [[1]], None],
    ("text_config", "eos_token_id"): [4096, 10**9, -1, [1, 10**9], "1"],
    ("text_config", "bos_token_id"): [4096, 10**9, -1, "2", 2.0],
    ("text_config", "pad_token_id"): [4096, 10**9, -1, "0", [0]],
    ("text_config", "rope_parameters", "full_attention", "partial_rotary_factor"): [2.0, -1, 0, math.nan, 1e-9, "x"],
    ("text_config", "rope_parameters", "sliding_attention", "rope_theta"): [0, -1, math.nan, math.inf, "x", 1e308],
    ("text_config", "rope_parameters"): ["x", [], {"full_attention": []}, {"full_attention": "x"}],
    ("text_config", "rms_norm_eps"): [-1, 0, math.nan, "x", 1e308, [], None],
    ("text_config", "final_logit_softcapping"): [0, -1, "x", math.nan, [], math.inf],
    ("text_config", "layer_types"): [["full_attention"] * 4, "x", [1, 2, 3, 4], ["sliding_attention"] * 4, {}],
    ("dtype",): ["float64", "int8", 5, "bfloat16", "float16", []],
    ("quantization_config",): [None, {}, "x", [], {"quant_method": "dgemma"}, {"quant_method": "modelopt"}],
}
GENERATION_TARGETS = {
    ("max_new_tokens",): [10**12, 0, -1, 1.5, "x", 2**63],
    ("max_denoising_steps",): [10**9, 0, -1, "x"],
    ("sampler_config",): [[], "x", {"entropy_bound": -1}, {"entropy_bound": math.nan}, {"entropy_bound": "x"}],
    ("t_min",): [math.nan, math.inf, -1, 5, "x"],
    ("t_max",): [math.nan, math.inf, -1, 0, "x"],
    ("eos_token_id",): [4096, 10**9, -1, [1, 10**9], "1", [1.5], {"a": 1}, [None]],
    ("pad_token_id",): [10**9, -1, "x", 4096, 1.5],
    ("stability_threshold",): [10**9, -1, "x"],
    ("confidence_threshold",): [0, math.nan, -1],
}
TEMPLATES = [
    "{% if %}",
    "{{ x",
    "{% for %}",
    "{% endfor %}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception('boom') }}",
    "{{ 1 / 0 }}",
    "{{ messages[99]['content'] }}",
    "{% extends 'base.html' %}",
    "{% include '/etc/passwd' %}",
    "{{ messages | map(attribute='x') | join }}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "{{ 'a' ~ messages }}",
    "{% set x = namespace() %}{{ x.y.z }}",
    "\xff\xfe",
    "{{ messages[0].content | int | abs }}",
    "{{ (messages | first).role.upper().encode() }}",
    "",
]
# Templates whose *rendering* is unbounded (a range past the sandbox's cap, megabytes of output to tokenize): the
# render-time bounds are issue 14 part 5, not the loader's; `--render-templates` adds them to the mutations.
RENDER_TEMPLATES = ["{{ range(10**9) | list | length }}", "{{ bos_token * 10**6 }}"]
DEVICES = ("/dev/zero", "/dev/null", "/dev/urandom", "/etc/passwd", "/proc/self/mem")


class Case:
    """One mutated copy: a base checkpoint hard-linked into `dir`, changed by `mutate`."""

    def __init__(self, rng: random.Random, base: Path, dst: Path, fmt: str):
        self.rng, self.base, self.dir, self.fmt = rng, base, dst, fmt

    def files(self, suffix: str = "") -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.name.endswith(suffix) and p.is_file())

    def pick(self, suffix: str = "") -> str | None:
        names = self.files(suffix)
        return self.rng.choice(names) if names else None

    def read(self, name: str) -> bytes:
        """The file as earlier mutations of this case left it, or the base's when they replaced it with a link,
        FIFO, directory or huge sparse file."""
        path = self.dir / name
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 64 << 20:
            return path.read_bytes()
        return (self.base / name).read_bytes()

    def write(self, name: str, data: bytes | str) -> None:
        """Write a fresh file (never through the hard link to the base)."""
        path = self.dir / name
        if path.is_symlink() or path.exists():
            _remove(path)
        path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def make_case(fmt: str, base: Path, dst: Path, seed: int, index: int) -> str:
    """Build case `index` of `fmt` in `dst` (removed first); returns what was done."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for p in base.iterdir():
        os.link(p, dst / p.name)
    rng = random.Random(f"{seed}:{fmt}:{index}")
    case = Case(rng, base, dst, fmt)
    table = [(m, w) for m, w, formats in MUTATIONS if formats is None or fmt in formats]
    n = 1 if rng.random() < 0.85 else rng.randint(2, 3)
    done = []
    for mutation in rng.choices([m for m, _ in table], [w for _, w in table], k=n):
        try:
            done.append(mutation(case) or "skipped")
        except Exception as e:  # noqa: BLE001 - a mutator's own bug must not stop the campaign; the case still runs
            done.append(f"{mutation.__name__} failed: {e!r}")
    return " + ".join(done)


def dumps(value) -> str:
    text = json.dumps(value)
    if DEEP in text:
        depth = random.Random(text).choice([64, 1000, 5000, 200_000])
        text = text.replace(f'"{DEEP}"', "[" * depth + "]" * depth)
    return text


def _nodes(tree, rng: random.Random) -> tuple[list, object]:
    """A random path into a JSON tree (a random walk from the root) and the node there."""
    path, node = [], tree
    while isinstance(node, (dict, list)) and node and (not path or rng.random() < 0.7):
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(key)
        node = node[key]
    return path, node


def _set(tree, path, value, delete: bool = False) -> None:
    node = tree
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value


def _load_json(case: Case, name: str):
    try:
        return json.loads(case.read(name))
    except (ValueError, RecursionError):
        return None


def m_json_value(case: Case) -> str | None:
    """A random node of a JSON file set to an evil value (or deleted)."""
    name = case.pick(".json")
    tree = _load_json(case, name) if name else None
    if not isinstance(tree, (dict, list)) or not tree:
        return None
    path, _ = _nodes(tree, case.rng)
    if not path:
        return None
    if case.rng.random() < 0.2:
        _set(tree, path, None, delete=True)
        what = "deleted"
    else:
        value = case.rng.choice(EVIL)
        _set(tree, path, value)
        what = f"= {dumps(value)[:40]}"
    case.write(name, dumps(tree))
    return f"json {name}:{'.'.join(map(str, path))[:80]} {what}"


def m_targeted(case: Case) -> str | None:
    """A known-dangerous value in config.json (or, for GGUF, generation_config.json)."""
    gen = case.rng.random() < 0.3 or not (case.dir / "config.json").is_file()
    name, targets = ("generation_config.json", GENERATION_TARGETS) if gen else ("config.json", CONFIG_TARGETS)
    tree = _load_json(case, name)
    if not isinstance(tree, dict):
        return None
    path = case.rng.choice(list(targets))
    value = case.rng.choice(targets[path])
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict):
        node[path[-1]] = value
    case.write(name, dumps(tree))
    return f"target {name}:{'.'.join(path)} = {dumps(value)[:40]}"


def m_json_text(case: Case) -> str | None:
    """Raw-text damage to a JSON file: truncation, flips, deep nesting, huge or empty files, wrong top-level types."""
    name = case.pick(".json")
    if name is None:
        return None
    data, rng = case.read(name), case.rng
    kind = rng.choice(["truncate", "flip", "deep", "huge", "sparse", "empty", "array", "bom", "latin1", "nul"])
    if kind == "truncate":
        data = data[: rng.randrange(len(data) + 1)]
    elif kind == "flip":
        data = _flip(data, rng, rng.randint(1, 8))
    elif kind == "deep":
        depth = rng.choice([100, 1000, 100_000, 1_000_000])
        data = ('{"a":' * depth + "1" + "}" * depth).encode()
    elif kind == "huge":
        data = b"{" + b" " * (2 << 20) + b'"a": 1}'
    elif kind == "sparse":
        case.write(name, b"")
        os.truncate(case.dir / name, rng.choice([65 << 20, 4 << 30]))
        return f"text {name}: sparse file of zeros"
    elif kind == "empty":
        data = b""
    elif kind == "array":
        data = rng.choice([b"[]", b"1", b'"x"', b"null", b"NaN"])
    elif kind == "bom":
        data = b"\xef\xbb\xbf" + data
    elif kind == "latin1":
        data = data.replace(b"a", b"\xe9", 3)
    else:
        data = data.replace(b'"', b"\x00", 1)
    case.write(name, data)
    return f"text {name}: {kind}"


def _flip(data: bytes, rng: random.Random, n: int, lo: int = 0, hi: int | None = None) -> bytes:
    buf = bytearray(data)
    hi = len(buf) if hi is None else min(hi, len(buf))
    for _ in range(n if hi > lo else 0):
        buf[rng.randrange(lo, hi)] = rng.randrange(256)
    return bytes(buf)


def m_template(case: Case) -> str:
    """A broken or hostile chat template (file or tokenizer_config entry)."""
    text = case.rng.choice(TEMPLATES)
    if case.rng.random() < 0.3:
        text = case.read("chat_template.jinja").decode()[: case.rng.randrange(2100)] + text
    if case.rng.random() < 0.7:
        case.write("chat_template.jinja", text)
        return f"template file {text[:40]!r}"
    if (case.dir / "chat_template.jinja").exists():
        _remove(case.dir / "chat_template.jinja")
    cfg = _load_json(case, "tokenizer_config.json") or {}
    cfg["chat_template"] = case.rng.choice([text, [{"name": "default", "template": text}], [1], {"x": 1}, 5])
    case.write("tokenizer_config.json", dumps(cfg))
    return f"template in tokenizer_config {dumps(cfg['chat_template'])[:40]}"


def m_tokenizer(case: Case) -> str | None:
    """tokenizer.json: out-of-range ids, a bigger vocabulary than the model's, garbage."""
    tree = _load_json(case, "tokenizer.json")
    if not isinstance(tree, dict):
        return None
    rng = case.rng
    kind = rng.choice(["added_id", "vocab_id", "extra_tokens", "model_type", "truncate"])
    if kind == "added_id" and tree.get("added_tokens"):
        rng.choice(tree["added_tokens"])["id"] = rng.choice([4096, 10**9, -1, 2**32, "x"])
    elif kind == "vocab_id" and isinstance(tree.get("model", {}).get("vocab"), dict):
        vocab = tree["model"]["vocab"]
        vocab[rng.choice(list(vocab))] = rng.choice([4096, 10**6, -1, 2**40])
    elif kind == "extra_tokens":
        n = rng.choice([1, 100, 5000])
        tree.setdefault("added_tokens", []).extend(
            {
                "id": 4096 + i,
                "content": f"<x{i}>",
                "special": True,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
            }
            for i in range(n)
        )
    elif kind == "model_type":
        tree.setdefault("model", {})["type"] = rng.choice(["Unigram", "WordPiece", "x", 5])
    else:
        case.write("tokenizer.json", case.read("tokenizer.json")[: rng.randrange(300_000)])
        return "tokenizer truncated"
    case.write("tokenizer.json", json.dumps(tree))
    return f"tokenizer {kind}"


def m_filesystem(case: Case) -> str | None:
    """A file replaced by a symlink (device, outside the directory, dangling, a loop), a FIFO or a directory."""
    names = sorted(p.name for p in case.dir.iterdir())
    name = case.rng.choice(names)
    path = case.dir / name
    kind = case.rng.choice(["device", "outside", "relative_out", "dangling", "loop", "fifo", "dir", "inside"])
    _remove(path)
    if kind == "device":
        target = case.rng.choice(DEVICES)
        path.symlink_to(target)
        return f"fs {name} -> {target}"
    if kind == "outside":
        path.symlink_to(case.base / name)
    elif kind == "relative_out":
        path.symlink_to(os.path.relpath(case.base / name, case.dir))
    elif kind == "dangling":
        path.symlink_to(case.dir / "nowhere")
    elif kind == "loop":
        path.symlink_to(path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    else:
        os.link(case.base / name, case.dir / f".{name}")
        path.symlink_to(f".{name}")  # allowed: stays inside the directory
    return f"fs {name}: {kind}"


def _header(data: bytes) -> tuple[int, dict | None]:
    n = struct.unpack("<Q", data[:8])[0]
    try:
        return n, json.loads(data[8 : 8 + n])
    except ValueError:
        return n, None


SHAPES = [
    [],
    [0],
    [-1],
    [4096.0, 128],
    [2**31, 2**31],
    [2**63],
    ["a"],
    [1.5],
    [True],
    None,
    "x",
    [[1]],
    [2**62, 4],
]
OFFSETS = [[0, 0], [-8, 0], [0.0, 8.0], [0, 2**63], [10**12, 10**12 + 4], "x", [0], [0, 1, 2], None, [1, 0]]
DTYPE_NAMES = ["F64", "I64", "BOOL", "U8", "F8_E4M3", "F8_E5M2", "BF16", "F16", "F32", "I32", "XYZ", "", 5, None]


def m_header(case: Case) -> str | None:
    """A structured change to one safetensors header entry, re-serialised (length updated or padded)."""
    name = case.pick(".safetensors")
    data = case.read(name) if name else b""
    n, header = _header(data) if len(data) >= 8 else (0, None)
    if not isinstance(header, dict):
        return None
    rng = case.rng
    key = rng.choice(sorted(header))
    info = header[key]
    field = rng.choice(["dtype", "shape", "data_offsets", "negate", "swap", "drop", "rename", "meta", "entry"])
    if field == "meta" or not isinstance(info, dict):
        header["__metadata__"] = rng.choice([5, [], {"format": 5}, {"x": "y" * 10000}, DEEP, None])
    elif field == "dtype":
        info["dtype"] = rng.choice(DTYPE_NAMES)
    elif field == "shape":
        info["shape"] = rng.choice(SHAPES)
    elif field == "data_offsets":
        info["data_offsets"] = rng.choice(OFFSETS)
    elif field == "negate":
        shape = info.get("shape") if isinstance(info.get("shape"), list) else []
        info["shape"] = [-x for x in shape[:2]] + shape[2:] if len(shape) >= 2 else [-1, *(-x for x in shape)]
    elif field == "swap":
        info["shape"] = list(reversed(info.get("shape", [])))
    elif field == "drop":
        del header[key]
    elif field == "rename":
        header[key + rng.choice(["_scale", "x", "_zero", ".weight"])] = header.pop(key)
    else:
        info[rng.choice(["extra", "dtype", "shape"])] = rng.choice(EVIL)
    raw = dumps(header).encode()
    if len(raw) <= n and rng.random() < 0.5:
        raw = raw.ljust(n)
    case.write(name, struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return f"header {name}:{key[-40:]} {field}"


def m_bytes(case: Case) -> str | None:
    """Byte-level damage to a weights file: length prefix, truncation, padding, flips in the header or the data."""
    name = case.pick(".safetensors") or case.pick(".gguf")
    if name is None:
        return None
    data, rng = case.read(name), case.rng
    n = struct.unpack("<Q", data[:8])[0] if name.endswith(".safetensors") else 4096
    kind = rng.choice(["length", "truncate", "pad", "sparse", "flip_header", "flip_data", "tiny"])
    if kind == "length":
        value = rng.choice([0, 1, 2, n - 1, n + 1, len(data) - 8, len(data), 2**63, 2**64 - 1, 100 << 20])
        data = struct.pack("<Q", value) + data[8:]
    elif kind == "truncate":
        data = data[: rng.choice([rng.randrange(len(data)), len(data) - 1, 8 + n, rng.randrange(64)])]
    elif kind == "pad":
        data += bytes(rng.choice([1, 7, 4096]))
    elif kind == "sparse":
        case.write(name, data)
        os.truncate(case.dir / name, len(data) + (2 << 30))
        return f"bytes {name}: 2 GiB sparse tail"
    elif kind == "flip_header":
        data = _flip(data, rng, rng.randint(1, 6), 0, 8 + n)
    elif kind == "flip_data":
        data = _flip(data, rng, rng.randint(1, 64), 8 + n)
    else:
        data = data[: rng.choice([0, 1, 7, 8])]
    case.write(name, data)
    return f"bytes {name}: {kind}"


def m_index(case: Case) -> str | None:
    """Index weight_map entries: traversal, absolute paths, wrong types, moved or ghost tensors."""
    tree = _load_json(case, "model.safetensors.index.json")
    if not isinstance(tree, dict) or not isinstance(tree.get("weight_map"), dict):
        return None
    wm, rng = tree["weight_map"], case.rng
    key = rng.choice(sorted(wm))
    shards = sorted(set(wm.values()))
    kind = rng.choice(["traversal", "absolute", "type", "moved", "ghost", "drop", "map_type", "dir", "self"])
    if kind == "traversal":
        wm[key] = rng.choice(["../x.safetensors", f"../{case.dir.name}/{wm[key]}", f"sub/../../{wm[key]}"])
    elif kind == "absolute":
        wm[key] = rng.choice(["/etc/passwd", "/dev/zero", str(case.base / wm[key])])
    elif kind == "type":
        wm[key] = rng.choice(EVIL)
    elif kind == "moved":
        wm[key] = rng.choice(shards)
    elif kind == "ghost":
        wm["model.decoder.ghost.weight"] = rng.choice(shards)
    elif kind == "drop":
        del wm[key]
    elif kind == "map_type":
        tree["weight_map"] = rng.choice([[], "x", {}, None, list(wm.items())])
    elif kind == "dir":
        wm[key] = rng.choice([".", "", "./"])
    else:
        wm[key] = "model.safetensors.index.json"
    case.write("model.safetensors.index.json", dumps(tree))
    return f"index {kind}"


def gguf_slots(path: Path) -> list[tuple[str, int, int, str]]:
    """(field name, byte offset, width, 'int'|'float'|'bytes') of every part of every GGUF header field."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(path)
    base = reader.data.ctypes.data
    slots = []
    fields = [*reader.fields.values(), *(t.field for t in reader.tensors)]
    for field in fields:
        for k, part in enumerate(field.parts):
            if part.size == 0:
                continue
            kind = "int" if np.issubdtype(part.dtype, np.integer) else "float"
            kind = "bytes" if part.dtype == np.uint8 and part.size > 1 else kind
            slots.append((f"{field.name}[{k}]", part.ctypes.data - base, part.itemsize, kind))
    return slots


_SLOTS: dict[Path, list] = {}


def m_gguf_field(case: Case) -> str | None:
    """One GGUF header value (a count, length, dim, type, offset or metadata value) set to an evil value."""
    name = case.pick(".gguf")
    if name is None:
        return None
    slots = _SLOTS.setdefault(case.base / name, gguf_slots(case.base / name))
    field, at, width, kind = case.rng.choice(slots)
    data = bytearray(case.read(name))
    if kind == "float":
        value = case.rng.choice([math.nan, math.inf, -1.0, 0.0, 1e30])
        data[at : at + width] = struct.pack({4: "<f", 8: "<d"}[width], value)
    elif kind == "int":
        value = case.rng.choice([0, 1, 2, 3, 255, 2**31 - 1, 2**32 - 1, 2**62, 2**64 - 1]) % (1 << (8 * width))
        data[at : at + width] = value.to_bytes(width, "little")
    else:
        value = "bytes"
        data[at : at + 1] = bytes([case.rng.randrange(256)])
    case.write(name, bytes(data))
    return f"gguf {field} = {value}"


def m_gguf_header(case: Case) -> str | None:
    """The GGUF preamble: magic, version, tensor count, metadata count."""
    name = case.pick(".gguf")
    if name is None:
        return None
    data = bytearray(case.read(name))
    at, width = case.rng.choice([(0, 4), (4, 4), (8, 8), (16, 8)])
    value = case.rng.choice([0, 1, 2, 3, 4, 2**31, 2**40, 2**63, 2**64 - 1]) % (1 << (8 * width))
    data[at : at + width] = value.to_bytes(width, "little")
    case.write(name, bytes(data))
    return f"gguf preamble @{at} = {value}"


def m_none(case: Case) -> str:
    return "unchanged"


SAFETENSORS = ("bundled", "sharded", "int4", "nvfp4", "fp8")
MUTATIONS = [  # (mutation, weight, formats or None for all)
    (m_json_value, 6, None),
    (m_targeted, 6, None),
    (m_json_text, 3, None),
    (m_template, 2, None),
    (m_tokenizer, 2, None),
    (m_filesystem, 2, None),
    (m_header, 6, SAFETENSORS),
    (m_bytes, 3, None),
    (m_index, 4, ("sharded",)),
    (m_gguf_field, 10, ("gguf",)),
    (m_gguf_header, 2, ("gguf",)),
    (m_none, 0.2, None),
]


# ---- worker -----------------------------------------------------------------------------------------------------


def worker(mem_mb: int) -> None:
    """Serve cases on stdin/stdout (one JSON line each) under an address-space cap; stdout itself goes to /dev/null
    so nothing the libraries print can corrupt the protocol."""
    os.environ.update(TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.path.insert(0, str(REPO / "src"))
    import logging

    import torch

    from dgemma.generate import Pipeline

    logging.disable(logging.CRITICAL)
    torch.set_num_threads(1)
    run_case(Pipeline, str(BUNDLED), 0)  # warm: every lazy import and allocator pool
    vm = _vm_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (vm + (mem_mb << 20), resource.RLIM_INFINITY))
    proto.write(json.dumps({"ready": vm}) + "\n")
    for line in sys.stdin:
        job = json.loads(line)
        result = _probe(job["probe"]) if "probe" in job else run_case(Pipeline, job["dir"], job["index"])
        proto.write(json.dumps(result) + "\n")


def _probe(kind: str) -> dict:
    """The harness's own checks (tests): a case that hangs, one that allocates far over the cap."""
    if kind == "hang":
        time.sleep(3600)
    try:
        bytearray(64 << 30)
    except MemoryError as e:
        return _error("memory", e)
    return {"outcome": "generated"}


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmSize:"))


def run_case(pipeline_cls, model_dir: str, index: int) -> dict:
    """Load, then one short generate; the outcome class and, for errors, the type, message and raising frame."""
    from dgemma.config import CheckpointError, ConfigError

    stage = "load"
    try:
        pipe = pipeline_cls.load(model_dir, device="cpu")
        stage = "generate"
        knobs = {"max_new_tokens": 4, "steps": 2, "seed": index}
        if pipe.tokenizer is None:
            pipe.generate(prompt_ids=[2, 10, 11], **knobs)
        else:
            pipe.generate("Once upon a time", chat=index % 2 == 1 and pipe.tokenizer.chat_template is not None, **knobs)
        return {"outcome": "generated"}
    except (CheckpointError, ConfigError) as e:
        return _error("refused" if stage == "load" else "refused_at_use", e)
    except MemoryError as e:
        return _error("memory", e)
    except BaseException as e:  # noqa: BLE001 - every other type is a finding
        if "can't allocate memory" in str(e) or "not enough memory" in str(e):
            return _error("memory", e)
        return _error("undocumented" if stage == "load" else "generate_failed", e)


def _error(outcome: str, e: BaseException) -> dict:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb else "?"
    return {"outcome": outcome, "type": type(e).__name__, "message": str(e)[:300], "where": where}


class Worker:
    """One worker subprocess; restarted after a hang or a crash."""

    def __init__(self, mem_mb: int):
        self.mem_mb, self.proc = mem_mb, None

    def start(self) -> None:
        cmd = [sys.executable, __file__, "--worker", "--mem-mb", str(self.mem_mb)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if self._read(120) is None:
            raise RuntimeError("fuzz worker did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, model_dir: Path, index: int, timeout: float, probe: str | None = None) -> dict:
        if self.proc is None:
            self.start()
        job = {"probe": probe} if probe else {"dir": str(model_dir), "index": index}
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        reply = self._read(timeout)
        if reply is not None:
            return reply
        alive = self.proc.poll() is None
        code = self.proc.returncode
        self.stop()
        if alive:
            return {"outcome": "hang", "type": "timeout", "message": f"over {timeout} s", "where": "?"}
        return {"outcome": "crash", "type": "exit", "message": f"worker exited with {code}", "where": "?"}

    def _read(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        return json.loads(line) if line else None


# ---- campaign ---------------------------------------------------------------------------------------------------


class Campaign:
    """Cases of every format shared out to `jobs` worker threads; results tallied per format."""

    def __init__(self, bases: dict[str, Path], seed: int, start: int, timeout: float, mem_mb: int, scratch: Path):
        self.bases, self.seed, self.timeout, self.mem_mb, self.scratch = bases, seed, timeout, mem_mb, scratch
        self.next = dict.fromkeys(bases, start)
        self.counts = {fmt: dict.fromkeys(OUTCOMES, 0) for fmt in bases}
        self.examples: dict[str, list] = {}
        self.errors: dict[str, int] = {}
        self.lock = threading.Lock()
        self.done, self.out, self.log, self.saved = 0, None, None, time.monotonic()

    def save(self) -> None:
        """Write the report so far to `out` (a campaign that is stopped still leaves its figures)."""
        self.saved = time.monotonic()
        self.out.write_text(json.dumps({**self.report(), "next_start": self.next}) + "\n")
        print(f"{self.done} cases, {self.report()['total_findings']} findings", file=sys.stderr, flush=True)

    def take(self, limit: int | None, deadline: float | None) -> tuple[str, int] | None:
        with self.lock:
            if deadline is not None and time.monotonic() > deadline:
                return None
            fmt = min(self.next, key=self.next.get)  # round-robin: formats stay level
            if limit is not None and self.next[fmt] >= limit:
                return None
            self.next[fmt] += 1
            return fmt, self.next[fmt] - 1

    def record(self, fmt: str, index: int, desc: str, result: dict) -> None:
        with self.lock:
            self.counts[fmt][result["outcome"]] += 1
            self.done += 1
            if self.log is not None:
                self.log.write(json.dumps({"case": f"{fmt}:{self.seed}:{index}", "mutation": desc, **result}) + "\n")
            if self.out is not None and time.monotonic() - self.saved > 60:
                self.save()
            if result["outcome"] in ("refused", "refused_at_use"):
                key = f"{result['outcome']}: {result['type']}"
                self.errors[key] = self.errors.get(key, 0) + 1
            if result["outcome"] in (*FINDINGS, "refused_at_use") or (
                result["outcome"] == "refused" and index % 50 == 0
            ):
                found = self.examples.setdefault(result["outcome"], [])
                if len(found) < 20:
                    found.append({"case": f"{fmt}:{self.seed}:{index}", "mutation": desc, **result})

    def run_thread(self, k: int, limit: int | None, deadline: float | None) -> None:
        w = Worker(self.mem_mb)
        try:
            while (job := self.take(limit, deadline)) is not None:
                fmt, index = job
                dst = self.scratch / f"j{k}" / "model"
                desc = make_case(fmt, self.bases[fmt], dst, self.seed, index)
                self.record(fmt, index, desc, w.run(dst, index, self.timeout))
        finally:
            w.stop()

    def run(self, jobs: int, limit: int | None, deadline: float | None) -> None:
        threads = [threading.Thread(target=self.run_thread, args=(k, limit, deadline)) for k in range(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def report(self) -> dict:
        findings = {fmt: sum(c[o] for o in FINDINGS) for fmt, c in self.counts.items()}
        cases = {fmt: sum(c.values()) for fmt, c in self.counts.items()}
        return {
            "seed": self.seed,
            "cases": cases,
            "counts": self.counts,
            "findings": findings,
            "total_findings": sum(findings.values()),
            "documented_errors": dict(sorted(self.errors.items())),
            "examples": self.examples,
        }


def print_table(report: dict) -> None:
    cols = ("cases", *OUTCOMES)
    print(f"{'format':<9}" + "".join(f"{c:>16}" for c in cols))
    for fmt, counts in report["counts"].items():
        print(f"{fmt:<9}{report['cases'][fmt]:>16}" + "".join(f"{counts[o]:>16}" for o in OUTCOMES))
    for outcome, found in report["examples"].items():
        for ex in found[:5]:
            print(
                f"  {outcome} {ex['case']} [{ex['mutation'][:70]}] {ex['type']} at {ex['where']}: {ex['message'][:90]}"
            )


def fuzz(
    formats=FORMATS,
    cases: int | None = None,
    minutes: float | None = None,
    seed: int = 0,
    start: int = 0,
    jobs: int = 1,
    timeout: float = 10.0,
    mem_mb: int = 1536,
    work: Path | None = None,
    out: Path | None = None,
    log: Path | None = None,
) -> dict:
    """Run a campaign (cases `start`..`start + cases` of each format, or as many as fit in `minutes`)."""
    with tempfile.TemporaryDirectory(prefix="dgemma-fuzz-") as tmp:
        root = Path(work or tmp)
        bases = build_bases(root / "bases", formats)
        scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=root))  # runs may share `work`, never scratch
        campaign = Campaign(bases, seed, start, timeout, mem_mb, scratch)
        campaign.out = out
        campaign.log = None if log is None else open(log, "a", buffering=1)  # noqa: SIM115 - closed below
        limit = None if cases is None else start + cases
        deadline = None if minutes is None else time.monotonic() + 60 * minutes
        try:
            campaign.run(jobs, limit, deadline)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if out is not None:
                campaign.save()
            if campaign.log is not None:
                campaign.log.close()
        return campaign.report()


def replay(spec: str, work: Path | None, timeout: float, mem_mb: int) -> dict:
    """Rebuild one case FORMAT:SEED:INDEX, print its mutation and run it."""
    fmt, seed, index = spec.split(":")
    with tempfile.TemporaryDirectory(prefix="dgemma-fuzz-") as tmp:
        root = Path(work or tmp)
        base = build_bases(root / "bases", (fmt,))[fmt]
        dst = Path(tempfile.mkdtemp(prefix="replay-", dir=root)) / "model"
        desc = make_case(fmt, base, dst, int(seed), int(index))
        w = Worker(mem_mb)
        try:
            return {"case": spec, "mutation": desc, "dir": str(dst), **w.run(dst, int(index), timeout)}
        finally:
            w.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", default="all", help=f"one of {', '.join(FORMATS)}, or all (comma lists work)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--cases", type=int, help="cases per format")
    budget.add_argument("--minutes", type=float, help="wall-clock budget for all formats together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="first case index (extend an earlier campaign)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it counts as a hang")
    p.add_argument("--mem-mb", type=int, default=1536, help="address space a worker may add over its warm size")
    p.add_argument("--work", type=Path, help="keep bases and scratch here (default: a temporary directory)")
    p.add_argument("--replay", help="run one case FORMAT:SEED:INDEX and print it")
    p.add_argument("--out", type=Path, help="also write the report here, every minute and at the end")
    p.add_argument("--log", type=Path, help="append one JSON line per case (case, mutation, outcome, error) here")
    p.add_argument("--render-templates", action="store_true", help="also templates whose rendering is unbounded")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.mem_mb)
        return 0
    if args.replay:
        print(json.dumps(replay(args.replay, args.work, args.timeout, args.mem_mb)))
        return 0
    if args.render_templates:
        TEMPLATES.extend(RENDER_TEMPLATES)
    formats = FORMATS if args.format == "all" else tuple(args.format.split(","))
    if unknown := set(formats) - set(FORMATS):
        p.error(f"unknown format(s) {sorted(unknown)}; choose from {', '.join(FORMATS)}")
    cases = args.cases if args.cases is not None or args.minutes is not None else 100
    t0 = time.monotonic()
    report = fuzz(
        formats,
        cases,
        args.minutes,
        args.seed,
        args.start,
        args.jobs,
        args.timeout,
        args.mem_mb,
        args.work,
        args.out,
        args.log,
    )
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["start"] = args.start
    print_table(report)
    print(json.dumps(report))
    return 1 if report["total_findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
