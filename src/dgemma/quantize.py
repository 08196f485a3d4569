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

import torch

KINDS = ("int8", "int4", "nvfp4", "fp8")
# E2M1 (FP4) values by 4-bit code; bit 3 is the sign (OCP MX spec / ModelOpt NVFP4)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
NVFP4_BLOCK = 16


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
        """The float weight [..., N, K], computed in fp32 then cast (the twin every kernel is tested against)."""
        g = self.group_size
        if self.kind == "int4":
            q = self.codes().float() - 8.0
            w = q * self.scale.float().repeat_interleave(g, -1) + self.zero.float().repeat_interleave(g, -1)
        elif self.kind == "nvfp4":
            lut = torch.tensor(E2M1, dtype=torch.float32, device=self.data.device)
            s = self.scale.float().repeat_interleave(g, -1) * self.global_scale.float()[..., None]
            w = lut[self.codes().long()] * s
        else:
            w = self.data.float() * self.scale.float().repeat_interleave(g, -1)
        return w.to(dtype)

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
    `group_size` inputs, in the tinygemm form w = (q - 8) * s + z with q in 0..15."""
    k = w.shape[-1]
    if k % group_size or group_size % 2:
        raise ValueError(f"group size {group_size} does not divide the input dimension {k}")
    x = w.float().unflatten(-1, (k // group_size, group_size))  # [..., N, K/g, g]
    lo, hi = x.amin(-1), x.amax(-1)
    scale = (hi - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((x - lo[..., None]) / scale[..., None]).clamp_(0, 15)
    zero = lo + 8.0 * scale  # w = lo + q * s = (q - 8) * s + (lo + 8 s)
    return Packed("int4", pack_nibbles(q.to(torch.uint8).flatten(-2)), scale, zero)
