"""Loader: sharded checkpoints, and every kind of broken or hostile directory gives a clear error (spec b)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import pickle
import resource
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import random_model, tiny_config

from dgemma.config import ConfigError
from dgemma.export import save_model
from dgemma.generate import Pipeline
from dgemma.loader import CheckpointError, load_model

WEIGHTS = "model.safetensors"
EMBED = "model.decoder.embed_tokens.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid dgemma-exported checkpoint (float32, no tokenizer)."""
    return save_model(random_model(tiny_config(), seed=5), tmp_path_factory.mktemp("good"))


@pytest.fixture
def ckpt(good, tmp_path):
    """A private copy of `good` to break."""
    return shutil.copytree(good, tmp_path / "ckpt")


def logits(model) -> torch.Tensor:
    cache = model.new_cache()
    model.encode(torch.arange(3, 20)[None], cache)
    return model.denoise(torch.arange(40, 40 + model.config.canvas_length)[None], cache)


def rewrite(path, change) -> None:
    """Apply `change(tensors)` to a safetensors file and write it back."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# --- sharded ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded(ref_main, tmp_path_factory):
    """The reference model saved in several shards with an index (real HF layout, vision tensors included)."""
    path = tmp_path_factory.mktemp("sharded")
    ref_main.model.save_pretrained(path, max_shard_size="20KB")
    return path


def test_sharded_checkpoint_gives_identical_logits(sharded, ref_main):
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(logits(load_model(sharded)), logits(ref_main.pipe.model), atol=0, rtol=0)


def test_index_entry_escaping_the_directory(sharded, tmp_path):
    ckpt = shutil.copytree(sharded, tmp_path / "ckpt")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"][EMBED] = "../x.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="escapes the model directory"):
        load_model(ckpt)


def test_index_lists_tensor_no_shard_holds(sharded, tmp_path):
    ckpt = shutil.copytree(sharded, tmp_path / "ckpt")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.decoder.ghost.weight"] = next(iter(index["weight_map"].values()))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost.*no shard holds it"):
        load_model(ckpt)


def test_index_names_missing_shard(sharded, tmp_path):
    ckpt = shutil.copytree(sharded, tmp_path / "ckpt")
    victim = min(ckpt.glob("model-*.safetensors"))
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name} listed by the index is missing"):
        load_model(ckpt)


# --- corrupt safetensors ---------------------------------------------------------------------------------------------
def test_truncated_file(ckpt):
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(ckpt)


def test_tiny_file(ckpt):
    (ckpt / WEIGHTS).write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too small"):
        load_model(ckpt)


def test_absurd_header_length(ckpt):
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(CheckpointError, match="header length"):
        load_model(ckpt)


def test_non_json_header(ckpt):
    data = (ckpt / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    (ckpt / WEIGHTS).write_bytes(data[:8] + b"\xff" * n + data[8 + n :])
    with pytest.raises(CheckpointError, match="not valid UTF-8 JSON"):
        load_model(ckpt)


def test_header_offsets_out_of_bounds(ckpt):
    data = (ckpt / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header[EMBED]["data_offsets"][1] += 4  # claims more bytes than its shape needs
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    (ckpt / WEIGHTS).write_bytes(data[:8] + raw.ljust(n) + data[8 + n :])
    with pytest.raises(CheckpointError, match="invalid dtype/shape/offset"):
        load_model(ckpt)


def test_missing_tensor(ckpt):
    rewrite(ckpt / WEIGHTS, lambda t: t.pop("model.decoder.layers.1.experts.down_proj"))
    with pytest.raises(CheckpointError, match="1 missing: model.decoder.layers.1.experts.down_proj"):
        load_model(ckpt)


def test_unexpected_tensor(ckpt):
    rewrite(ckpt / WEIGHTS, lambda t: t.update({"model.decoder.layers.0.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="1 unexpected: model.decoder.layers.0.extra.weight"):
        load_model(ckpt)


def test_vision_and_lm_head_tensors_are_skipped(ckpt, good):
    extra = {"model.encoder.vision_tower.patch.weight": torch.zeros(2, 2), "lm_head.weight": torch.zeros(1)}
    rewrite(ckpt / WEIGHTS, lambda t: t.update(extra))
    torch.testing.assert_close(logits(load_model(ckpt)), logits(load_model(good)), atol=0, rtol=0)


def test_wrong_shape(ckpt):
    rewrite(ckpt / WEIGHTS, lambda t: t.update({EMBED: torch.zeros(128, 32)}))
    with pytest.raises(CheckpointError, match=r"embed_tokens.weight: shape \[128, 32\] but config implies \[128, 64\]"):
        load_model(ckpt)


def test_wrong_dtype_vs_config(ckpt):
    rewrite(ckpt / WEIGHTS, lambda t: t.update({EMBED: t[EMBED].half()}))
    with pytest.raises(CheckpointError, match="embed_tokens.weight: dtype F16, expected F32"):
        load_model(ckpt)


def test_pickle_only_directory_is_refused_and_never_unpickled(ckpt, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (ckpt / WEIGHTS).unlink()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="pickle-based weights.*pytorch_model.bin"):
        load_model(ckpt)
    assert not marker.exists()


def test_no_weights_at_all(ckpt):
    (ckpt / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(ckpt)


# --- config ----------------------------------------------------------------------------------------------------------
def edit_config(ckpt, change) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    change(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_config_invalid_json(ckpt):
    (ckpt / "config.json").write_text('{"text_config": {')
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_model(ckpt)


def test_config_negative_layers(ckpt):
    edit_config(ckpt, lambda c: c["text_config"].update(num_hidden_layers=-2))
    with pytest.raises(ConfigError, match="num_hidden_layers must be a positive integer, got -2"):
        load_model(ckpt)


def test_config_missing_text_config(ckpt):
    edit_config(ckpt, lambda c: c.pop("text_config"))
    with pytest.raises(ConfigError, match="no 'text_config'"):
        load_model(ckpt)


def test_untied_checkpoint_is_refused(ckpt):
    edit_config(ckpt, lambda c: c.update(tie_word_embeddings=False))
    with pytest.raises(ConfigError, match="untied checkpoints"):
        load_model(ckpt)


def test_config_disagrees_with_weights(ckpt):
    edit_config(ckpt, lambda c: c["text_config"].update(hidden_size=32))
    with pytest.raises(CheckpointError, match="does not match config.json"):
        load_model(ckpt)


def test_missing_config_and_missing_directory(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(ckpt)


def test_auto_map_is_ignored(ckpt, good, caplog):
    marker = ckpt / "imported"
    (ckpt / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    edit_config(ckpt, lambda c: c.update(auto_map={"AutoModel": "modeling_evil.Evil"}))
    with caplog.at_level(logging.WARNING, logger="dgemma.loader"):
        model = load_model(ckpt)
    assert "auto_map" in caplog.text and not marker.exists()
    torch.testing.assert_close(logits(model), logits(load_model(good)), atol=0, rtol=0)


# --- tokenizer-less checkpoints --------------------------------------------------------------------------------------
def test_checkpoint_without_tokenizer_is_id_level(good):
    pipe = Pipeline.load(good, device="cpu")
    assert pipe.tokenizer is None
    result = pipe.generate(prompt_ids=[5, 6, 7], seed=1, max_new_tokens=8, steps=3)
    assert len(result.token_ids) == 8 and result.text == ""
    with pytest.raises(ConfigError, match="no tokenizer.json; pass prompt token ids"):
        pipe.generate("hello", seed=1, max_new_tokens=8, steps=3)


def test_non_finite_weights_warn_unless_the_check_is_off(ckpt, caplog):
    state = load_file(str(ckpt / WEIGHTS))
    state[EMBED][3, 1] = float("nan")
    save_file(state, str(ckpt / WEIGHTS), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="dgemma.loader"):
        load_model(ckpt)  # small checkpoint: checked by default
    assert "NaN/Inf" in caplog.text and "embed_tokens.weight" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dgemma.loader"):
        load_model(ckpt, check_finite=False)  # what a checkpoint above FINITE_CHECK_BYTES gets by default
    assert "NaN/Inf" not in caplog.text


def test_hub_ids_download_weights_configs_and_tokenizer_only(tok_checkpoint, monkeypatch, capsys):
    """`-m org/name` (CLI, serve, Python API) goes through huggingface_hub into its cache; mocked: CI never touches
    a hub. Only safetensors, JSON, templates and tokenizer files are asked for; --offline asks the cache only."""
    import huggingface_hub

    from dgemma.cli import main
    from dgemma.loader import CheckpointError, resolve_model_dir

    calls = []

    def fake_download(repo_id, allow_patterns=None, local_files_only=False, **kw):
        calls.append((repo_id, tuple(allow_patterns), local_files_only))
        if repo_id == "org/missing":
            raise huggingface_hub.errors.RepositoryNotFoundError("404 Client Error: repository not found")
        return str(tok_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert main(["generate", "-m", "org/name", "In the beginning", "-n", "4", "-s", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) <= 4 and calls[-1][0] == "org/name" and calls[-1][2] is False
    assert not any(p.endswith(".py") or p == "*" for p in calls[-1][1])  # never code
    assert Pipeline.load("org/name", device="cpu", offline=True).tokenizer is not None and calls[-1][2] is True
    assert main(["generate", "-m", "org/name", "--offline", "x", "-n", "2", "-q"]) == 0 and calls[-1][2] is True
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="cannot get 'org/missing' on the hub"):
        resolve_model_dir("org/missing")
    for bad in ("a/b/c", "/abs/none", "./rel/x", "org/"):
        with pytest.raises(CheckpointError, match="does not exist"):
            resolve_model_dir(bad)
    assert main(["generate", "-m", "org/missing", "hi"]) == 3
    assert capsys.readouterr().err.startswith("error: cannot get 'org/missing'")


def test_loading_reports_progress(tok_checkpoint):
    calls = []
    load_model(tok_checkpoint, progress=lambda done, total: calls.append((done, total)))
    assert calls and all(a[0] < b[0] for a, b in itertools.pairwise(calls))  # monotonic, one call per tensor
    assert (
        calls[-1][0]
        == calls[-1][1]
        == sum(f.stat().st_size for f in tok_checkpoint.glob("*.safetensors"))
        - sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in tok_checkpoint.glob("*.safetensors"))
    )  # every byte of tensor data, none of the headers


# --- hardening: regressions found by scripts/fuzz_loader.py ----------------------------------------------------------
def header_edit(ckpt, change) -> None:
    """Apply `change(header)` to model.safetensors' JSON header, keeping the data bytes."""
    data = (ckpt / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    change(header)
    raw = json.dumps(header).encode()
    (ckpt / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.mark.timeout(20)
def test_fifo_as_json_file_is_refused_not_read(ckpt):
    (ckpt / "generation_config.json").unlink()
    os.mkfifo(ckpt / "generation_config.json")  # opening it for reading would block forever
    with pytest.raises(CheckpointError, match="generation_config.json is not a regular file"):
        Pipeline.load(ckpt, device="cpu")


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/null"])
def test_symlink_to_a_device_is_refused(ckpt, target):
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to(target)  # /dev/zero used to be read until memory ran out
    with pytest.raises(CheckpointError, match="config.json is not a regular file"):
        load_model(ckpt)


def test_symlinks_escaping_the_directory_are_refused(ckpt, good, tmp_path):
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to(good / "config.json")
    with pytest.raises(CheckpointError, match="outside the model directory"):
        load_model(ckpt)
    (ckpt / "config.json").unlink()
    shutil.copyfile(good / "config.json", ckpt / "config.json")
    (ckpt / WEIGHTS).unlink()
    (ckpt / WEIGHTS).symlink_to(good / WEIGHTS)
    with pytest.raises(CheckpointError, match="outside the model directory"):
        load_model(ckpt)


def test_symlinks_inside_the_directory_and_into_hf_cache_blobs_load(good, tmp_path):
    """A Hugging Face cache snapshot links every file to ../../blobs/<hash>: that stays allowed."""
    repo = tmp_path / "models--org--name"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, p in enumerate(sorted(good.iterdir())):
        shutil.copyfile(p, blobs / f"hash{i}")
        (snapshot / p.name).symlink_to(Path("..") / ".." / "blobs" / f"hash{i}")
    torch.testing.assert_close(logits(load_model(snapshot)), logits(load_model(good)), atol=0, rtol=0)
    assert Pipeline.load(snapshot, device="cpu").settings == Pipeline.load(good, device="cpu").settings


def test_oversized_json_is_refused_before_reading(ckpt):
    with open(ckpt / "generation_config.json", "r+b") as f:
        f.truncate(64 << 20)  # sparse: costs no disk
    with pytest.raises(CheckpointError, match="over the 1048576-byte limit"):
        Pipeline.load(ckpt, device="cpu")


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_is_a_config_error(ckpt, depth):
    (ckpt / "config.json").write_text('{"a":' * depth + "1" + "}" * depth)  # RecursionError past ~1000
    with pytest.raises(ConfigError, match="config.json is nested too deeply"):
        load_model(ckpt)


def test_json_nan_is_refused(ckpt):
    (ckpt / "generation_config.json").write_text('{"t_min": NaN}')
    with pytest.raises(ConfigError, match="generation_config.json is not valid JSON: NaN"):
        Pipeline.load(ckpt, device="cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.update(rms_norm_eps="x"), "rms_norm_eps must be a positive finite number"),
        (lambda t: t.update(final_logit_softcapping=[]), "final_logit_softcapping must be a positive"),
        (lambda t: t.update(layer_types=5), "layer_types must be a list of strings"),
        (lambda t: t.update(per_layer_config=[]), "per_layer_config must be an object"),
        (lambda t: t.update(per_layer_config={"x": {}}), "per_layer_config names layer 'x'"),
        (lambda t: t.update(per_layer_config={"1": []}), r"per_layer_config\['1'\] must be an object"),
        (lambda t: t.update(rope_parameters="x"), "rope_parameters must be an object"),
        (lambda t: t.update(rope_parameters={"full_attention": "x"}), "rope_parameters.*must be an object"),
        (lambda t: t["rope_parameters"]["full_attention"].update(partial_rotary_factor=2.0), "partial_rotary_factor"),
        (lambda t: t["rope_parameters"]["sliding_attention"].update(rope_theta="x"), "rope_theta must be a number"),
        (lambda t: t.update(pad_token_id="0"), "pad_token_id must be an integer"),
        (lambda t: t.update(eos_token_id=[1.5]), "eos_token_id must be an integer"),
    ],
)
def test_mistyped_config_values_are_config_errors_naming_the_key(ckpt, change, message):
    """These raised AttributeError / TypeError / ValueError / RuntimeError (RoPE tables) before."""
    edit_config(ckpt, lambda c: change(c["text_config"]))
    with pytest.raises(ConfigError, match=f"config.json: .*{message}"):
        load_model(ckpt)


def test_quantization_config_of_the_wrong_type(ckpt):
    edit_config(ckpt, lambda c: c.update(quantization_config=-1))
    with pytest.raises(CheckpointError, match="quantization_config must be a JSON object"):
        load_model(ckpt)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("head_dim", 2**31),  # allocated 4.4 GB for RoPE before failing
        ("max_position_embeddings", 10**12),
        ("num_hidden_layers", 10**6),
        ("num_experts", 2**20),
        ("sliding_window", 2**31),
    ],
)
def test_absurd_dimensions_are_refused_before_any_allocation(ckpt, key, value):
    edit_config(ckpt, lambda c: c["text_config"].update({key: value}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"{key} = {value} exceeds the supported maximum"):
        load_model(ckpt)
    assert time.perf_counter() - t0 < 2 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000


def test_canvas_beyond_the_context_is_refused(ckpt):
    edit_config(ckpt, lambda c: c.update(canvas_length=10**6))
    with pytest.raises(ConfigError, match="canvas_length = 1000000 exceeds"):
        load_model(ckpt)


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        ("config.json", lambda c: c.update(eos_token_id=[1, 10**9]), "eos_token_id 1000000000 is outside the vocab"),
        ("config.json", lambda c: c["text_config"].update(bos_token_id=128), "bos_token_id 128 is outside"),
        ("generation_config.json", lambda c: c.update(eos_token_id=[1, 128]), "token id 128 is outside the vocab"),
        ("generation_config.json", lambda c: c.update(pad_token_id=-1), "pad_token_id must be an integer >= 0"),
        ("generation_config.json", lambda c: c.update(max_denoising_steps=10**9), "max_denoising_steps = 10+ exceeds"),
    ],
)
def test_token_ids_and_generation_values_are_checked_at_load(ckpt, file, change, message):
    cfg = json.loads((ckpt / file).read_text())
    change(cfg)
    (ckpt / file).write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=f"{file}: .*{message}"):
        Pipeline.load(ckpt, device="cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h: h[EMBED].update(shape=[float(s) for s in h[EMBED]["shape"]]), "invalid dtype/shape/offset"),
        (lambda h: h[EMBED].update(shape=[-s for s in h[EMBED]["shape"]]), "invalid dtype/shape/offset"),
        (lambda h: h.update(__metadata__={"format": 5}), "__metadata__ must map strings to strings"),
    ],
)
def test_header_entries_the_safetensors_library_rejects_are_refused_first(ckpt, change, message):
    """Float shapes and negative dim pairs (same product) passed the own check, then failed in safetensors."""
    header_edit(ckpt, change)
    with pytest.raises(CheckpointError, match=f"model.safetensors: .*{message}"):
        load_model(ckpt)


def test_header_extra_keys_and_null_metadata_are_accepted_as_safetensors_does(ckpt, good):
    header_edit(ckpt, lambda h: (h[EMBED].update(extra=1), h.update(__metadata__=None)))
    torch.testing.assert_close(logits(load_model(ckpt)), logits(load_model(good)), atol=0, rtol=0)


def test_duplicate_tensor_names_in_a_header(ckpt):
    data = (ckpt / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    raw = data[8 : 8 + n].rstrip()
    entry = json.dumps({EMBED: json.loads(raw)[EMBED]})[1:-1].encode()
    raw = raw[:-1] + b"," + entry + b"}"
    (ckpt / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    with pytest.raises(CheckpointError, match="names 'model.decoder.embed_tokens.weight' twice"):
        load_model(ckpt)


def test_safetensors_library_errors_become_checkpoint_errors(ckpt, monkeypatch):
    import safetensors

    import dgemma.loader

    def broken(*args, **kwargs):
        raise safetensors.SafetensorError("Error while deserializing header: something new")

    monkeypatch.setattr(dgemma.loader, "safe_open", broken)
    with pytest.raises(CheckpointError, match="model.safetensors: tensor .* cannot be read: .*something new"):
        load_model(ckpt)


@pytest.mark.parametrize("value", [5, ["a.safetensors"], "", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_values_of_the_wrong_type_or_shape(sharded, tmp_path, value):
    ckpt = shutil.copytree(sharded, tmp_path / "ckpt")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"][EMBED] = value
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"weight_map\[.*must be a shard file name|escapes the model directory"):
        load_model(ckpt)


def test_chat_template_syntax_errors_are_refused_at_load(tok_checkpoint, tmp_path):
    ckpt = shutil.copytree(tok_checkpoint, tmp_path / "ckpt")
    (ckpt / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(ConfigError, match="chat template does not compile: .*endfor"):
        Pipeline.load(ckpt, device="cpu")
    (ckpt / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ConfigError, match="chat_template.jinja is not valid UTF-8"):
        Pipeline.load(ckpt, device="cpu")


def test_tokenizer_config_with_deep_nesting_or_unhashable_template_names(tok_checkpoint, tmp_path):
    ckpt = shutil.copytree(tok_checkpoint, tmp_path / "ckpt")
    (ckpt / "tokenizer_config.json").write_text('{"eos_token": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(ConfigError, match="tokenizer_config.json is nested too deeply"):
        Pipeline.load(ckpt, device="cpu")
    (ckpt / "chat_template.jinja").unlink(missing_ok=True)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": [], "template": "x"}]}))
    assert Pipeline.load(ckpt, device="cpu").tokenizer.chat_template is None


def test_fifo_tokenizer_is_refused_not_skipped(tok_checkpoint, tmp_path):
    ckpt = shutil.copytree(tok_checkpoint, tmp_path / "ckpt")
    (ckpt / "tokenizer.json").unlink()
    os.mkfifo(ckpt / "tokenizer.json")  # was silently treated as "no tokenizer"
    with pytest.raises(CheckpointError, match="tokenizer.json is not a regular file"):
        Pipeline.load(ckpt, device="cpu")


def test_lone_surrogate_special_token_is_a_config_error(tok_checkpoint, tmp_path):
    ckpt = shutil.copytree(tok_checkpoint, tmp_path / "ckpt")
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "\ud800"}))  # was UnicodeEncodeError
    with pytest.raises(ConfigError, match="bos_token/eos_token is not valid Unicode"):
        Pipeline.load(ckpt, device="cpu")


def test_config_dtype_of_the_wrong_type(ckpt):
    edit_config(ckpt, lambda c: c.update(dtype={"a": 1}))  # was TypeError: unhashable type
    with pytest.raises(ConfigError, match="config.json dtype must be a string"):
        load_model(ckpt)


def test_template_raising_at_render_is_refused_at_use(tok_checkpoint, tmp_path):
    ckpt = shutil.copytree(tok_checkpoint, tmp_path / "ckpt")
    (ckpt / "chat_template.jinja").write_text("{{ 1 / 0 }}")  # compiles; was ZeroDivisionError from generate
    pipe = Pipeline.load(ckpt, device="cpu")
    with pytest.raises(ConfigError, match="chat template failed: (ZeroDivisionError|division by zero)"):
        pipe.generate("hi", chat=True, max_new_tokens=4, steps=2, seed=0)


@pytest.mark.timeout(30)
def test_gguf_array_count_past_the_file_is_refused_before_the_reader(tmp_path):
    """gguf.GGUFReader loops over an array's claimed length: a count of 2^32 - 1 hung it."""
    from gguf_fixtures import write_gguf

    path = write_gguf(tmp_path / "model.gguf", random_model(tiny_config(), seed=1))
    data = bytearray(path.read_bytes())
    key = b"diffusion-gemma.attention.sliding_window_pattern"
    at = data.index(key) + len(key) + 8  # value type u32, item type u32, then the u64 count
    data[at : at + 8] = struct.pack("<Q", 2**32 - 1)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.gguf: the GGUF header claims .* past the end"):
        load_model(tmp_path)


def test_gguf_that_cannot_be_mapped_is_a_checkpoint_error(tmp_path, monkeypatch):
    """Under an address-space cap a huge file's map fails with OSError (the fuzzer's 2 GiB sparse tails)."""
    import mmap

    from gguf_fixtures import write_gguf

    write_gguf(tmp_path / "model.gguf", random_model(tiny_config(), seed=1))

    def no_map(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", no_map)
    with pytest.raises(CheckpointError, match="model.gguf: cannot be mapped: Cannot allocate memory"):
        load_model(tmp_path)


def test_gguf_head_dim_of_one_is_a_config_error(tmp_path):
    """key_length = 1 divided the rope_freqs count by head_dim // 2 = 0 (ZeroDivisionError); now the config says why."""
    from gguf_fixtures import write_gguf

    path = write_gguf(tmp_path / "model.gguf", random_model(tiny_config(), seed=1))
    data = bytearray(path.read_bytes())
    key = b"diffusion-gemma.attention.key_length"
    at = data.index(key + b"\x04\x00\x00\x00") + len(key) + 4  # u32 value type 4 (uint32), then the value
    data[at : at + 4] = struct.pack("<I", 1)
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="model.gguf metadata: .*head_dim 1 must be even"):
        load_model(tmp_path)
