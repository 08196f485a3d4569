"""The Triton fused MoE against its twins: run on CPU tensors under Triton's interpreter (conftest sets
TRITON_INTERPRET=1 when there is no GPU), which checks the kernel's indexing, masking, nibble order and
dequantization; on a GPU the same tests run the compiled kernel."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_config

from dgemma import triton_moe
from dgemma.model import Experts
from dgemma.quantize import quantize_int4

pytestmark = pytest.mark.skipif(not triton_moe.available(), reason="needs triton (a CUDA GPU or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("n", "k", "experts", "block_m"), [(7, 2, 4, 16), (40, 2, 8, 16), (33, 3, 5, 32)])
def test_align_sorts_pads_and_labels_blocks(n, k, experts, block_m):
    g = torch.Generator().manual_seed(n)
    idx = torch.randint(0, experts, (n, k), generator=g)
    rows, block_expert = triton_moe.align(idx, experts, block_m)
    total = n * k
    assert rows.numel() % block_m == 0 and rows.numel() >= total + experts * (block_m - 1) - block_m + 1
    real = rows[rows < total]
    assert sorted(real.tolist()) == list(range(total))  # every assignment exactly once
    flat = idx.reshape(-1)
    for b, e in enumerate(block_expert.tolist()):
        ids = rows[b * block_m : (b + 1) * block_m]
        ids = ids[ids < total]
        if e < 0:
            assert ids.numel() == 0
        else:
            assert (flat[ids.long()] == e).all()  # a block holds one expert's rows
    counts = torch.bincount(flat, minlength=experts)
    used = (block_expert >= 0).sum().item()
    assert used == ((counts + block_m - 1) // block_m).sum().item()


@pytest.mark.parametrize("group", [32, 64])
def test_fused_moe_matches_the_dequantized_twin(group):
    cfg = tiny_config(hidden_size=128, moe_intermediate_size=64, num_experts=6, top_k_experts=2).text
    g = torch.Generator().manual_seed(group)
    gu = quantize_int4(torch.randn(6, 128, 128, generator=g) * 0.05, group)  # [E, 2I, H]
    dn = quantize_int4(torch.randn(6, 128, 64, generator=g) * 0.05, group)  # [E, H, I]
    twin = Experts(cfg)  # the float experts holding the dequantized weights, one token at a time
    with torch.no_grad():
        twin.gate_up_proj.copy_(gu.dequantize())
        twin.down_proj.copy_(dn.dequantize())
    x = torch.randn(37, 128, generator=g)
    weights, idx = torch.rand(37, 2, generator=g), torch.randint(0, 6, (37, 2), generator=g)
    ref = twin(x, weights, idx, "loop")
    to = lambda p: type(p)(p.kind, p.data.to(DEVICE), p.scale.to(DEVICE), p.zero.to(DEVICE))  # noqa: E731
    out = triton_moe.fused_moe(x.to(DEVICE), weights.to(DEVICE), idx.to(DEVICE), to(gu), to(dn))
    tol = 1e-5 if DEVICE == "cpu" else 2e-2  # fp32 under the interpreter; bf16 MMA on a GPU
    assert ((out.cpu().float() - ref).norm() / ref.norm()).item() < tol


def test_fused_moe_with_no_tokens():
    gu = quantize_int4(torch.randn(2, 32, 64) * 0.05, 32)
    dn = quantize_int4(torch.randn(2, 64, 16) * 0.05, 16)
    out = triton_moe.fused_moe(torch.zeros(0, 64), torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long), gu, dn)
    assert out.shape == (0, 64)
