"""Weight-only quantization: packed weights, the modules that run them, and the swap that puts them in a model.

The model file stays pure float math (`model.py`); quantized layers are swapped in from here before the weights are
assigned, as gpt-fast and mlx-lm do. Three levels:

- `Packed`: one quantized weight as data (codes + scales), in the canonical forms every format maps to losslessly:
  - "int8": int8 codes [..., N, K], fp32 scale [..., N, K/g]: w = q * s (g = K: one scale per output channel);
  - "int4": uint8 [..., N, K/2] two codes 0..15 per byte (element 2k in the low nibble), fp32 scale and zero
    [..., N, K/g]: w = (q - 8) * s + z (the tinygemm form; symmetric schemes have z = 0);
  - "nvfp4": uint8 [..., N, K/2] two E2M1 codes per byte (element 2k low), float8_e4m3fn block scale [..., N, K/16]
    and an fp32 global scale per row [..., N]: w = E2M1[code] * s * g (ModelOpt's NVFP4, kept 4-bit);
  - "fp8": float8_e4m3fn [..., N, K], fp32 scale [..., N, K/g]: w = float(q) * s (compressed-tensors FP8).
  `dequantize()` is the slow, obviously correct twin of every kernel below.
- `QuantLinear`, `QuantExperts`, `QuantEmbedding`: drop-in replacements for `nn.Linear`, `model.Experts` and
  `model.TiedEmbedding`, each with a packed kernel and its dequantize-then-float twin.
- `quantize_module` / `swap_modules`: quantize a float model in memory, or build the empty quantized modules a
  checkpoint's tensors are assigned to.

What is quantized (`quant_target`): every linear of attention, the dense MLP and self-conditioning, the routed
experts, and (optionally) the tied embedding / LM head. The router and the norms stay in float: they are tiny and
routing decisions are sensitive.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_moe
from .model import DiffusionGemma, Experts, TiedEmbedding

log = logging.getLogger(__name__)

KINDS = ("int8", "int4", "nvfp4", "fp8")
# E2M1 (FP4) values by 4-bit code; bit 3 is the sign (OCP MX spec / ModelOpt NVFP4)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
NVFP4_BLOCK = 16
SCALE_DTYPE = torch.bfloat16  # int4 scales and zeros as dgemma stores them


@dataclasses.dataclass
class Packed:
    """One quantized weight of logical shape [..., N, K] (see the module docstring for each kind's layout)."""

    kind: str
    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None  # int4 only
    global_scale: torch.Tensor | None = None  # nvfp4 only: fp32 [..., N]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown quantized kind {self.kind!r}; expected one of {KINDS}")

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical [..., N, K] of the float weight."""
        *lead, n, k = self.data.shape
        return (*lead, n, k * 2 if self.kind in ("int4", "nvfp4") else k)

    @property
    def group_size(self) -> int:
        return self.shape[-1] // self.scale.shape[-1]

    def codes(self) -> torch.Tensor:
        """Unpacked integer codes [..., N, K] (uint8 0..15 for the 4-bit kinds, the stored int8 otherwise)."""
        if self.kind in ("int4", "nvfp4"):
            return unpack_nibbles(self.data)
        return self.data

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [..., N, K], computed in fp32 then cast (the twin every kernel is tested against).
        Scales broadcast over their groups ([..., N, K/g, g]): no [..., N, K] copy of them is made."""
        groups = self.scale.shape[-1]

        def grouped(t: torch.Tensor) -> torch.Tensor:
            return t.float()[..., None]  # [..., N, K/g, 1]

        if self.kind == "int4":
            q = self.codes().unflatten(-1, (groups, -1)).float() - 8.0  # [..., N, K/g, g]
            w = q * grouped(self.scale) + grouped(self.zero)
        elif self.kind == "nvfp4":
            lut = torch.tensor(E2M1, dtype=torch.float32, device=self.data.device)
            q = lut[self.codes().long()].unflatten(-1, (groups, -1))
            w = q * (grouped(self.scale) * self.global_scale.float()[..., None, None])
        else:
            w = self.data.float().unflatten(-1, (groups, -1)) * grouped(self.scale)
        return w.flatten(-2).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The on-disk tensors by suffix: "" (the codes), "_scale", and "_zero" / "_global" where the kind has one."""
        out = {"": self.data, "_scale": self.scale}
        if self.zero is not None:
            out["_zero"] = self.zero
        if self.global_scale is not None:
            out["_global"] = self.global_scale
        return out


def unpack_nibbles(data: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> uint8 [..., K]: element 2k is the low nibble of byte k, 2k + 1 the high one."""
    low, high = data & 0x0F, data >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., K] (K even) -> uint8 [..., K/2], element 2k in the low nibble."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> Packed:
    """Symmetric round-to-nearest int8 of a float weight [..., N, K]: one scale per output channel (group_size None
    or K) or per `group_size` inputs. Codes in [-127, 127] (the -128 code is never used, so negation is exact)."""
    k = w.shape[-1]
    g = group_size or k
    if k % g:
        raise ValueError(f"group size {g} does not divide the input dimension {k}")
    x = w.float().unflatten(-1, (k // g, g))  # [..., N, K/g, g]
    scale = x.abs().amax(-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / scale[..., None]).clamp_(-127, 127).to(torch.int8).flatten(-2)
    return Packed("int8", q, scale)


def quantize_int4(w: torch.Tensor, group_size: int = 64) -> Packed:
    """Asymmetric (min/max) round-to-nearest int4 of a float weight [..., N, K], one scale and zero per
    `group_size` inputs, in the tinygemm form w = (q - 8) * s + z with q in 0..15. Scale and zero are bf16 (what the
    packed kernels read; fp32 would cost 0.0625 more bytes per weight at group 64, 1.5 GB on the 26B model), rounded
    before the codes are chosen so the codes fit the stored scales."""
    k = w.shape[-1]
    if k % group_size or group_size % 2:
        raise ValueError(f"group size {group_size} does not divide the input dimension {k}")
    x = w.float().unflatten(-1, (k // group_size, group_size))  # [..., N, K/g, g]
    lo, hi = x.amin(-1), x.amax(-1)
    scale = (hi - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(SCALE_DTYPE)
    zero = (lo + 8.0 * scale.float()).to(SCALE_DTYPE)  # w = lo + q * s = (q - 8) * s + (lo + 8 s)
    base = zero.float() - 8.0 * scale.float()
    q = torch.round((x - base[..., None]) / scale.float()[..., None]).clamp_(0, 15)
    return Packed("int4", pack_nibbles(q.to(torch.uint8).flatten(-2)), scale, zero)


def select(p: Packed, index) -> Packed:
    """p[index] on the first dim: an expert of a 3-D weight, or output rows of a 2-D one."""
    pick = lambda t: None if t is None else t[index]
    return Packed(p.kind, p.data[index], p.scale[index], pick(p.zero), pick(p.global_scale))


# ---------------------------------------------------------------------------------------------------------------
# Specs: what a module's weights are, derived from a checkpoint's tensor table or chosen by `dgemma quantize`.


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one weight [..., N, K] is stored: a `Packed` kind and its group size (None = one scale per row)."""

    kind: str
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown quantized kind {self.kind!r}; expected one of {KINDS}")

    def tensors(self, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The on-disk tensors of a weight of logical `shape`: suffix -> (safetensors dtype, shape)."""
        *lead, n, k = shape
        g = self.group_size or (NVFP4_BLOCK if self.kind == "nvfp4" else k)
        groups = (*lead, n, k // g)
        if self.kind == "int8":
            return {"": ("I8", tuple(shape)), "_scale": ("F32", groups)}
        if self.kind == "fp8":
            return {"": ("F8_E4M3", tuple(shape)), "_scale": ("F32", groups)}
        packed = (*lead, n, k // 2)
        if self.kind == "int4":
            return {"": ("U8", packed), "_scale": ("BF16", groups), "_zero": ("BF16", groups)}
        return {"": ("U8", packed), "_scale": ("F8_E4M3", groups), "_global": ("F32", (*lead, n))}

    def fits(self, shape: tuple[int, ...]) -> bool:
        k = shape[-1]
        g = self.group_size or (NVFP4_BLOCK if self.kind == "nvfp4" else k)
        return k % g == 0 and (self.kind not in ("int4", "nvfp4") or k % 2 == 0)


def spec_of(p: Packed) -> QuantSpec:
    g = p.group_size
    per_row = g == p.shape[-1] and p.kind in ("int8", "fp8")
    return QuantSpec(p.kind, None if per_row else g)


# ---------------------------------------------------------------------------------------------------------------
# Kernels. A weight is held in the layout of the fastest kernel the device has for it:
#   "int8pack": per-row int8, `torch._weight_int8pack_mm` (CPU and CUDA);
#   "int4cpu": `torch._weight_int4pack_mm_for_cpu` (tinygemm form, scales and zeros [K/g, N, 2]);
#   "int4cuda": `torch._weight_int4pack_mm` (tinygemm, sm80+, bf16 activations);
#   "triton": int4 experts on CUDA with Triton: the canonical `Packed` (bf16 scales), run by the fused sync-free
#   `triton_moe.fused_moe` for the whole layer (per expert, like "packed", anywhere else);
#   "packed": the canonical `Packed`, dequantized per call (group-wise int8, fp8, NVFP4 through its lookup table,
#   and shapes the packed kernels refuse). Each is tested against `Packed.dequantize`.
# The packed kernels run on bf16 activations and bf16 scales whatever the model's dtype: with fp32 activations both
# CPU kernels take a scalar path, 35-70x slower than with bf16 (measured on AVX2, [64, 2816] x [1408, 2816]: int8
# 226 vs 6.3 ms, int4 453 vs 7.0 ms, fp32 F.linear 6.5 ms). The product is cast back to the activation dtype.
KERNEL_DTYPE = torch.bfloat16


def _int4_kernel(device: torch.device, shape: tuple[int, ...], group: int) -> str | None:
    n, k = shape[-2:]
    if n % 16 or group not in (32, 64, 128, 256) or k % group:
        return None
    if device.type == "cpu":
        return "int4cpu"
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 and k % 32 == 0:
        return "int4cuda"
    return None


def _aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """t itself if contiguous and 64-byte aligned, else a copy. A memory-mapped checkpoint tensor starts wherever the
    file puts it, and the CPU int8 kernel crashes (SIGSEGV, measured) on data that is not 32-byte aligned."""
    if t.is_contiguous() and t.data_ptr() % alignment == 0:
        return t
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    return out.copy_(t)


CAST_ROWS = 8192  # int8cast: weight rows cast to the activation dtype at a time (the LM head has 262,144)


def _cast_linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (q [N, K] * s [N])^T with the codes cast a block of rows at a time, into one output."""
    out = torch.empty(x.shape[0], q.shape[0], dtype=x.dtype, device=x.device)
    for a in range(0, q.shape[0], CAST_ROWS):
        out[:, a : a + CAST_ROWS] = F.linear(x, q[a : a + CAST_ROWS].to(x.dtype)) * s[a : a + CAST_ROWS].to(x.dtype)
    return out


def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


class QuantWeight(nn.Module):
    """One quantized weight of logical shape [..., N, K] (2-D for a linear, [E, N, K] for experts), in its kernel's
    layout. `matmul(x, e)` = x [M, K] @ W[e]^T -> [M, N]; `dequantize(e)` is the float weight (a twin)."""

    def __init__(self, shape: tuple[int, ...], spec: QuantSpec, kernels: bool = True):
        super().__init__()
        self.shape, self.spec, self.kernels = tuple(shape), spec, kernels
        self.layout: str | None = None
        self.packed: Packed | None = None

    def load(self, p: Packed, dtype: torch.dtype, device: torch.device | str) -> None:
        """Take a checkpoint's `Packed` (any device) and convert it to this device's kernel layout."""
        want = self.spec.group_size or (NVFP4_BLOCK if self.spec.kind == "nvfp4" else self.shape[-1])
        assert (tuple(p.shape), p.kind, p.group_size) == (self.shape, self.spec.kind, want), (p.shape, self.spec)
        device, self.dtype = torch.device(device), dtype
        p = Packed(
            p.kind,
            p.data.to(device),
            p.scale.to(device, torch.float32 if p.kind != "nvfp4" else p.scale.dtype),
            None if p.zero is None else p.zero.to(device, torch.float32),
            None if p.global_scale is None else p.global_scale.to(device, torch.float32),
        )
        int4 = _int4_kernel(device, self.shape, p.group_size) if p.kind == "int4" and self.kernels else None
        if p.kind == "int4" and len(self.shape) == 3 and triton_moe.supports(device, p.group_size):
            bf16 = lambda t: t.to(torch.bfloat16).contiguous()
            self.layout, self.packed = "triton", Packed("int4", p.data.contiguous(), bf16(p.scale), bf16(p.zero))
        elif p.kind == "int8" and p.group_size == self.shape[-1]:
            # CUDA's int8pack kernel is one thread per output (no tiling, 32-bit indices): there the codes are cast
            # a block of rows at a time for cuBLAS, and the per-row scale applied to the product
            self.layout = "int8pack" if device.type == "cpu" else "int8cast"
            self.register_buffer("q", _aligned(p.data), persistent=False)
            self.register_buffer("s", p.scale[..., 0].contiguous(), persistent=False)  # fp32, cast per call
        elif int4 is not None:
            self.layout, self.group = int4, p.group_size
            q, sz = self._pack_int4(p, int4)
            self.register_buffer("q", q, persistent=False)
            self.register_buffer("sz", sz, persistent=False)
        else:
            self.layout, self.packed = "packed", p

    @staticmethod
    def _pack_int4(p: Packed, layout: str):
        """Per 2-D slice: the tinygemm packing of the codes and [K/g, N, 2] scales/zeros (the kernel's order)."""
        codes = p.codes().reshape(-1, *p.shape[-2:])  # [L, N, K]
        sz = torch.stack([p.scale, p.zero], dim=-1).reshape(-1, *p.scale.shape[-2:], 2)  # [L, N, K/g, 2]
        sz = sz.transpose(1, 2).contiguous()  # [L, K/g, N, 2]
        if layout == "int4cpu":
            q = torch.stack([torch._convert_weight_to_int4pack_for_cpu(c.to(torch.int32), 2) for c in codes])
            return q.reshape(*p.shape[:-2], *q.shape[1:]), sz.to(KERNEL_DTYPE).reshape(*p.shape[:-2], *sz.shape[1:])
        tiles = _inner_k_tiles(p.shape[-1])  # CUDA: even element in the high nibble (tinygemm's convention)
        hi_lo = (codes[..., 0::2] << 4) | codes[..., 1::2]  # [L, N, K/2]
        q = torch.stack([torch._convert_weight_to_int4pack(c.contiguous(), tiles) for c in hi_lo])
        return q.reshape(*p.shape[:-2], *q.shape[1:]), sz.to(torch.bfloat16).reshape(*p.shape[:-2], *sz.shape[1:])

    def matmul(self, x: torch.Tensor, e: int | None = None) -> torch.Tensor:
        """x [M, K] -> [M, N] in x's dtype."""
        if self.layout in ("packed", "triton"):
            return F.linear(x, self.dequantize(e, x.dtype))
        q = self.q if e is None else self.q[e]
        if self.layout == "int8cast":
            return _cast_linear(x, q, self.s if e is None else self.s[e])
        xk = x.to(KERNEL_DTYPE)
        if self.layout == "int8pack":
            s = (self.s if e is None else self.s[e]).to(KERNEL_DTYPE)
            return torch._weight_int8pack_mm(xk, q, s).to(x.dtype)
        sz = self.sz if e is None else self.sz[e]
        if self.layout == "int4cpu":
            return torch._weight_int4pack_mm_for_cpu(xk, q, self.group, sz).to(x.dtype)
        return torch._weight_int4pack_mm(xk, q, self.group, sz).to(x.dtype)

    def dequantize(self, e: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [N, K] (of expert e): from the canonical form, or through the kernel on the identity
        (exact: each output is one weight times 1) for layouts that keep only the kernel's packing."""
        dtype = dtype or self.dtype
        if self.layout in ("packed", "triton"):
            return (self.packed if e is None else select(self.packed, e)).dequantize(dtype)
        if self.layout in ("int8pack", "int8cast"):
            q, s = (self.q, self.s) if e is None else (self.q[e], self.s[e])
            return (q.float() * s.float()[:, None]).to(dtype)
        eye = torch.eye(self.shape[-1], dtype=KERNEL_DTYPE, device=self.q.device)
        return self.matmul(eye, e).t().to(dtype)  # [N, K]

    @property
    def nbytes(self) -> int:
        if self.layout in ("packed", "triton"):
            return sum(t.nbytes for t in self.packed.tensors().values())
        return sum(b.nbytes for b in self.buffers())


class QuantLinear(nn.Module):
    """Drop-in for a bias-free `nn.Linear` whose weight is a `QuantWeight` (checkpoint keys `<name>.weight`,
    `<name>.weight_scale`, ...)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = QuantWeight((out_features, in_features), spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight.matmul(x.reshape(-1, self.in_features))  # [M, N]
        return y.view(*x.shape[:-1], self.out_features)


class QuantExperts(Experts):
    """`model.Experts` with quantized (or float) gate_up [E, 2I, H] and down [E, H, I]. "grouped" runs the packed
    kernels per hit expert; "loop" is the twin on dequantized weights; the sync-free "grouped_mm" runs the fused
    Triton kernel (`triton_moe`) for int4 experts on CUDA, and "grouped" elsewhere (no other grouped quantized
    kernel exists)."""

    def __init__(self, cfg, gate_up: QuantSpec | None, down: QuantSpec | None):
        nn.Module.__init__(self)
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.num_experts = e
        self.gate_up_proj = QuantWeight((e, 2 * i, h), gate_up) if gate_up else nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = QuantWeight((e, h, i), down) if down else nn.Parameter(torch.empty(e, h, i))

    @staticmethod
    def _apply(w, e: int, x: torch.Tensor, reference: bool) -> torch.Tensor:
        if isinstance(w, QuantWeight):
            return F.linear(x, w.dequantize(e, x.dtype)) if reference else w.matmul(x, e)
        return F.linear(x, w[e])

    def expert(self, e: int, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        gate, up = self._apply(self.gate_up_proj, e, x, reference).chunk(2, dim=-1)
        return self._apply(self.down_proj, e, F.gelu(gate, approximate="tanh") * up, reference)

    def reference_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.expert(e, x, reference=True)

    def forward(self, x, weights, idx, impl: str = "grouped"):
        if impl == "loop":
            return self.loop(x, weights, idx)
        fused = all(isinstance(w, QuantWeight) and w.layout == "triton" for w in (self.gate_up_proj, self.down_proj))
        if impl == "grouped_mm" and fused:
            return triton_moe.fused_moe(x, weights, idx, self.gate_up_proj.packed, self.down_proj.packed)
        return self.grouped(x, weights, idx)


class QuantEmbedding(TiedEmbedding):
    """The tied embedding / LM head / self-conditioning mixer on a quantized E [V, H]. Lookups and the mixer
    dequantize only the rows they touch (the mixer in chunks of rows, so no float [V, H] copy is ever held); the LM
    head runs the int8 kernel for a per-row int8 embedding (the scheme `dgemma quantize` writes)."""

    CHUNK = 8192  # rows of E dequantized at a time by `mix`

    def __init__(self, vocab: int, hidden: int, spec: QuantSpec):
        nn.Module.__init__(self)
        self.weight = QuantWeight((vocab, hidden), spec, kernels=False)

    def rows(self, index) -> torch.Tensor:
        w = self.weight
        if w.layout in ("int8pack", "int8cast"):
            return w.q[index].to(w.dtype) * w.s[index][..., None].to(w.dtype)
        return select(w.packed, index).dequantize(w.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids.reshape(-1)).view(*ids.shape, -1)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        w, h = self.weight, hidden.shape[-1]
        if w.layout in ("int8pack", "int8cast"):
            return self.weight.matmul(hidden.reshape(-1, h)).view(*hidden.shape[:-1], -1)
        chunks = range(0, w.shape[0], self.CHUNK)
        return torch.cat([F.linear(hidden, self.rows(slice(a, a + self.CHUNK))) for a in chunks], -1)  # [..., V]

    def mix(self, rows: torch.Tensor) -> torch.Tensor:
        v = self.weight.shape[0]
        out = torch.zeros(rows.shape[0], self.weight.shape[1], dtype=torch.float32, device=rows.device)
        for a in range(0, v, self.CHUNK):
            out += torch.matmul(rows[:, a : a + self.CHUNK], self.rows(slice(a, a + self.CHUNK))).float()  # [N, H]
        return out.to(rows.dtype)  # partial sums kept in fp32


# ---------------------------------------------------------------------------------------------------------------
# What gets quantized, and the swap.

SCHEMES = ("int8", "int4")
EMBEDDINGS = ("int8", "bf16")  # "bf16": the embedding stays in the model's float dtype


@dataclasses.dataclass(frozen=True)
class Scheme:
    """What `dgemma quantize` writes: int8 per output channel or int4 in groups for every linear and the experts,
    and an int8 per-row (or float) tied embedding. The router and norms stay float."""

    bits: str = "int4"
    group_size: int = 64
    embedding: str = "int8"

    def __post_init__(self) -> None:
        if self.bits not in SCHEMES or self.embedding not in EMBEDDINGS:
            raise ValueError(f"scheme must be one of {SCHEMES} and embedding one of {EMBEDDINGS}")
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group size must be a power of two >= 16, not {self.group_size}")

    def spec(self, target: str, shape: tuple[int, ...]) -> QuantSpec | None:
        """The spec for one weight, or None to keep it float. int4 takes the largest power-of-two group <= the
        requested one that divides K (704 and 2112 take 64, not 128), and falls back to int8 if none >= 16 does."""
        if target == "embedding":
            return QuantSpec("int8") if self.embedding == "int8" else None
        if self.bits == "int8":
            return QuantSpec("int8")
        g = self.group_size
        while g >= 16 and shape[-1] % g:
            g //= 2
        return QuantSpec("int4", g) if g >= 16 else QuantSpec("int8")

    def config(self) -> dict:
        """The `quantization_config` entry of config.json."""
        return {"quant_method": "dgemma", "bits": self.bits, "group_size": self.group_size, "embedding": self.embedding}


def model_nbytes(model: nn.Module) -> int:
    """Bytes of a model's weights, quantized ones in their kernels' layout (`state_dict` misses those: their
    buffers are not persistent and a packed layout's tensors are not buffers)."""
    quant = [m for m in model.modules() if isinstance(m, QuantWeight)]
    inside = {id(b) for m in quant for b in m.buffers()}
    floats = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in inside]
    return sum(m.nbytes for m in quant) + sum(t.nbytes for t in floats)


def quant_target(module: nn.Module, name: str) -> str | None:
    """ "linear" | "experts" | "embedding" for the modules the room quantizes (the router stays float)."""
    if isinstance(module, TiedEmbedding):
        return "embedding"
    if isinstance(module, Experts):
        return "experts"
    if isinstance(module, nn.Linear) and not name.endswith("router.proj"):
        return "linear"
    return None


def weight_names(module: nn.Module, target: str) -> tuple[str, ...]:
    return ("gate_up_proj", "down_proj") if target == "experts" else ("weight",)


def plan_scheme(model: DiffusionGemma, scheme: Scheme) -> dict[str, QuantSpec | None]:
    """Module-relative weight name ("layers.0.experts.gate_up_proj", "embed_tokens.weight", ...) -> its spec."""
    plan = {}
    for name, module in model.named_modules():
        target = quant_target(module, name)
        for w in weight_names(module, target) if target else ():
            plan[f"{name}.{w}"] = scheme.spec(target, tuple(getattr(module, w).shape))
    return plan


def swap_modules(model: DiffusionGemma, plan: dict[str, QuantSpec | None]) -> DiffusionGemma:
    """Replace (in place) every module with a quantized weight in `plan` by its empty quantized twin; `load` on its
    `QuantWeight`s fills it. Built on the current default device (meta, in the loader)."""
    cfg = model.text
    for name, module in list(model.named_modules()):
        target = quant_target(module, name)
        if target is None:
            continue
        specs = [plan.get(f"{name}.{w}") for w in weight_names(module, target)]
        if not any(specs):
            continue
        if target == "experts":
            new = QuantExperts(cfg, *specs)
        elif target == "embedding":
            new = QuantEmbedding(*module.weight.shape, specs[0])
        else:
            new = QuantLinear(module.in_features, module.out_features, specs[0])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def quantize_model(model: DiffusionGemma, scheme: Scheme) -> DiffusionGemma:
    """Quantize a float model in memory (tests, benchmarks): the same specs `dgemma quantize` writes."""
    plan = plan_scheme(model, scheme)
    floats = {name: getattr(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]) for name in plan}
    dtype, device = model.dtype, model.device
    swap_modules(model, plan)
    for name, spec in plan.items():
        if spec is not None:
            owner, _, w = name.rpartition(".")
            getattr(model.get_submodule(owner), w).load(pack(floats[name].detach(), spec), dtype, device)
        elif isinstance(model.get_submodule(name.rpartition(".")[0]), QuantExperts):
            owner, _, w = name.rpartition(".")
            setattr(model.get_submodule(owner), w, nn.Parameter(floats[name].detach(), requires_grad=False))
    return model


def pack(w: torch.Tensor, spec: QuantSpec) -> Packed:
    """Quantize a float weight [..., N, K] to `spec` (round to nearest), in slices (`pack_slices`) so that no full
    fp32 copy of a large tensor is ever made."""
    parts = list(pack_slices(w, spec))
    join = lambda ts: None if ts[0] is None else torch.cat(ts)
    p = Packed(spec.kind, join([q.data for q in parts]), join([q.scale for q in parts]), join([q.zero for q in parts]))
    return Packed(p.kind, *(None if t is None else t.reshape(*w.shape[:-1], -1) for t in (p.data, p.scale, p.zero)))


PACK_ELEMENTS = 1 << 23  # elements quantized at a time: its fp32 temporaries are a few times 32 MB


def pack_slices(w: torch.Tensor, spec: QuantSpec) -> Iterator[Packed]:
    """`Packed` pieces of w [..., N, K] flattened to rows [L*N, K], in row order, each of at most PACK_ELEMENTS
    (the embedding of the 26B model is 0.74 G elements: quantized whole, its fp32 temporaries took 9 GB)."""
    if spec.kind not in ("int8", "int4"):
        raise ValueError(f"dgemma quantizes to int8 or int4, not {spec.kind}")
    k = w.shape[-1]
    rows = w.reshape(-1, k)  # [L*N, K] (a view of a contiguous tensor, or of a safetensors slice)
    step = max(1, PACK_ELEMENTS // k)
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        yield quantize_int8(chunk, spec.group_size) if spec.kind == "int8" else quantize_int4(chunk, spec.group_size)
