"""A fused, sync-free MoE for int4 experts in Triton: the GPU path for quantized checkpoints (dgemma's int4 layout,
and GGUF Q4_K / Q4_0 re-expressed in it).

Two pieces, both free of host reads, so a step can be captured in a CUDA graph:
- `align`: the N*K (token, slot) assignments sorted by expert on the device and padded per expert to whole blocks
  of `block_m` rows, into a buffer of static size (N*K + E*(block_m - 1), rounded up); each block knows its expert
  (-1 for the unused tail). Computed with bincount / cumsum / argsort / searchsorted, never `.tolist()`.
- `int4_grouped_gemm`: one kernel launch per projection. Program (block b, column tile n) multiplies its gathered
  rows by expert e's weight, unpacking two 4-bit codes per byte and dequantizing them in registers
  (w = (q - 8) * s + z, a scale and zero per `group` inputs), then a bf16/fp32 dot with fp32 accumulation. The
  weights are read once per block: the step is bound by reading ~0.56 bytes per parameter.
`fused_moe` chains them: gate_up for every assignment, GELU-tanh gate * up, down scaled by the routing weight, and
the K slots of each token summed in slot order (deterministic; no atomics).

The twin is `quantize.QuantExperts.loop` (dequantized weights, one token at a time); tests run the kernels on CPU
tensors under Triton's interpreter (TRITON_INTERPRET=1), which checks indexing, masking and unpacking but not speed.
Triton ships with the CUDA build of torch on Linux; without it `available()` is False and the experts run the
per-expert packed kernels.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .quantize import Packed


@functools.cache
def available() -> bool:
    """Triton importable, and a device it can run on (CUDA, or the interpreter on CPU tensors)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def supports(device: torch.device, group: int) -> bool:
    """Whether the fused kernel runs int4 experts of this group size here: CUDA sm80+ (bf16 MMA), a power-of-two
    group from 16 to 256 (the K tile is min(64, group) and must be a power of two >= 16)."""
    if device.type != "cuda" or group not in (16, 32, 64, 128, 256) or not available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def align(idx: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """idx [N, K] expert ids -> (rows [R] int32: assignment index t*K + slot, or N*K for padding;
    block_expert [R / block_m] int32: each block's expert, -1 past the last used block). R is a static bound."""
    flat = idx.reshape(-1).to(torch.int64)  # [N*K]
    total = flat.numel()
    capacity = -(-(total + num_experts * (block_m - 1)) // block_m) * block_m
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    start = torch.cumsum(counts, 0) - counts  # first sorted index of each expert
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    order = torch.argsort(flat, stable=True)  # assignments by expert
    expert_of = flat[order]
    slot = padded_start[expert_of] + torch.arange(total, device=idx.device) - start[expert_of]
    rows = torch.full((capacity,), total, dtype=torch.int32, device=idx.device)
    rows[slot] = order.to(torch.int32)
    block_start = torch.arange(0, capacity, block_m, device=idx.device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)  # [R / block_m]
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return rows, block_expert


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def int4_grouped_gemm(
        x_ptr,  # [*, K] activations (rows gathered through rows_ptr // gather_div)
        w_ptr,  # [E, N, K/2] uint8, element 2k in the low nibble
        s_ptr,  # [E, N, K/G] scales
        z_ptr,  # [E, N, K/G] zeros
        rows_ptr,  # [R] int32 assignment ids (total = padding)
        block_expert_ptr,  # [R / BLOCK_M] int32
        out_ptr,  # [total, N]
        total,
        n_out,
        k_in,
        gather_div,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        e = tl.load(block_expert_ptr + pid_m)
        if e >= 0:
            ids = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
            valid = ids < total
            src = tl.where(valid, ids // gather_div, 0)
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
            col_ok = cols < n_out
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            w_row = w_ptr + e.to(tl.int64) * n_out * (k_in // 2) + cols[:, None] * (k_in // 2)  # [BN, 1]
            sz_row = e.to(tl.int64) * n_out * (k_in // GROUP) + cols[:, None] * (k_in // GROUP)
            for k0 in range(0, k_in, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + src[:, None] * k_in + ks[None, :], mask=valid[:, None], other=0.0)  # [BM, BK]
                half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                packed = tl.load(w_row + half[None, :], mask=col_ok[:, None], other=0)  # [BN, BK/2] uint8
                low, high = packed & 0x0F, packed >> 4
                codes = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))  # interleave: element 2k, 2k + 1
                g = ks // GROUP
                s = tl.load(s_ptr + sz_row + g[None, :], mask=col_ok[:, None], other=0.0)
                z = tl.load(z_ptr + sz_row + g[None, :], mask=col_ok[:, None], other=0.0)
                w = (codes.to(tl.float32) - 8.0) * s + z  # [BN, BK]
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))  # bf16 activations: tensor-core MMA
            out = out_ptr + ids[:, None].to(tl.int64) * n_out + cols[None, :]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])

    return int4_grouped_gemm


def int4_grouped_gemm(x, w: Packed, rows, block_expert, total: int, gather_div: int, block_m: int) -> torch.Tensor:
    """out [total, N]: row t = x[t // gather_div] @ W[expert of t]^T, for the assignments listed in `rows`."""
    _, n, k = w.shape  # [E, N, K]
    group = w.group_size
    block_k = min(64, group)
    assert k % block_k == 0 and group % block_k == 0, (k, group)
    out = torch.empty(total, n, dtype=x.dtype, device=x.device)
    block_n = 64 if n >= 64 else 16
    grid = (block_expert.numel(), -(-n // block_n))
    _kernel()[grid](
        x.contiguous(),
        w.data,
        w.scale.contiguous(),
        w.zero.contiguous(),
        rows,
        block_expert,
        out,
        total,
        n,
        k,
        gather_div,
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out


def fused_moe(x, weights, idx, gate_up: Packed, down: Packed, block_m: int = 16) -> torch.Tensor:
    """The routed experts for tokens x [N, H] (weights, idx [N, K]) on int4 `Packed` weights, sync-free."""
    n, k = idx.shape
    if n == 0:
        return torch.zeros_like(x)
    rows, block_expert = align(idx, gate_up.shape[0], block_m)
    h = int4_grouped_gemm(x, gate_up, rows, block_expert, n * k, k, block_m)  # [N*K, 2I]
    gate, up = h.chunk(2, dim=-1)
    act = F.gelu(gate, approximate="tanh") * up  # [N*K, I]
    y = int4_grouped_gemm(act, down, rows, block_expert, n * k, 1, block_m)  # [N*K, H]
    y = y * weights.reshape(-1, 1).to(y.dtype)
    return y.view(n, k, -1).sum(1).to(x.dtype)
