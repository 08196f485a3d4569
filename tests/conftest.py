"""Shared fixtures: reference checkpoints are built once per session; parity figures are reported at the end.

transformers is imported lazily (inside fixtures) so tests that never touch the reference run without it.
"""

from __future__ import annotations

import os
import shutil

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the OpenMP pool's barrier waits
# dominate (measured: ~7 ms per denoise step with 1 thread, 50-170 ms with 2 while other processes run). The
# environment variable also reaches the CLI subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU, Triton kernels run under Triton's interpreter on CPU tensors (tests/test_triton_moe.py); it must be
# set before triton is first imported.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

PARITY_KEY = pytest.StashKey[dict]()

# The second architecture (spec g, "different sizes, layer patterns, knobs"): 4 layers, canvas 16, other head
# counts/dims, more experts, window 6, non-default RoPE. The last layer is given as sliding on purpose: both the
# reference and dgemma force it to full attention.
VARIANT = {
    "canvas_length": 16,
    "vocab_size": 96,
    "hidden_size": 48,
    "intermediate_size": 80,
    "moe_intermediate_size": 24,
    "num_hidden_layers": 4,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    "num_attention_heads": 6,
    "num_key_value_heads": 3,
    "head_dim": 8,
    "global_head_dim": 24,
    "num_global_key_value_heads": 2,
    "sliding_window": 6,
    "num_experts": 6,
    "top_k_experts": 3,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 20000.0},
    },
}


class Reference:
    """A transformers reference model, its saved checkpoint directory and the matching dgemma Pipeline."""

    def __init__(self, model, path):
        from dgemma.generate import Pipeline

        self.model, self.path = model, path
        self.pipe = Pipeline.load(path, device="cpu", dtype="float32")
        self.vocab = model.config.text_config.vocab_size
        self.canvas = model.config.canvas_length


@pytest.fixture(scope="session")
def ref_main(tmp_path_factory):
    """The spec's tiny model (2 layers, window 8, canvas 8)."""
    import reference

    model = reference.build(seed=0)
    return Reference(model, reference.save(model, tmp_path_factory.mktemp("ref_main")))


@pytest.fixture(scope="session")
def ref_variant(tmp_path_factory):
    import reference

    model = reference.build(seed=3, **VARIANT)
    return Reference(model, reference.save(model, tmp_path_factory.mktemp("ref_variant")))


@pytest.fixture(scope="session")
def tok_checkpoint(tmp_path_factory):
    """A dgemma-exported checkpoint with tokenizer and chat template (no transformers needed)."""
    from tiny import checkpoint_with_tokenizer

    return checkpoint_with_tokenizer(tmp_path_factory.mktemp("tok_ckpt"))


@pytest.fixture(scope="session")
def parity_log(request):
    """Record a named max-abs-diff; all of them are printed in the terminal summary."""
    return request.config.stash.setdefault(PARITY_KEY, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    figures = config.stash.get(PARITY_KEY, None)
    if figures:
        terminalreporter.section("parity vs transformers 5.23.0 (max abs diff, fp32)")
        for name, value in figures.items():
            terminalreporter.write_line(f"{name:<48} {value:.3e}")
