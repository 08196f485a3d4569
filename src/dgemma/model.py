"""The DiffusionGemma text transformer as pure tensor math (spec section c).

One weight set, two modes: `encode` runs causally over new tokens and appends their keys/values to a `KVCache`
(prompt prefill and commit of a finished canvas); `denoise` runs bidirectionally over a canvas against a cache it
never writes and returns soft-capped fp32 logits. Module and parameter names mirror the checkpoint's
`model.decoder.*` keys so loading is an identity map (the encoder's own `layer_scalar`s live beside the decoder's
as `encoder_layer_scalar`). No file I/O, tokenizer, sampling or quantization here.

Execution options are fixed when a model is built (`Execution`; `with_execution` gives another view of the same
weights), never flipped on a shared model. Every fast path has a slow twin: attention "sdpa" | "eager"; MoE
"grouped" (one GEMM per hit expert, counts read on the host), "grouped_mm" (sync-free: `torch._grouped_mm` over the
expert-sorted rows with device-side offsets, no host read inside the forward) | "loop". `invariant` makes a batch of
stacked requests compute each row exactly as it would alone (the serving engine needs seeded outputs independent of
batch composition): attention runs row by row (`attend_rowwise`), and expert and self-conditioning GEMMs pad their
rows (`pad_rows`, always on, so the default path computes the same bits). Dense GEMMs see B*C rows, which is enough
when the canvas is a multiple of INVARIANT_ROWS (`generate.denoise_step` runs other canvases one request at a
time). Invariance holds on CPU only, so it is used only there (`Execution.for_serving`).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import FULL, LayerGeometry, ModelConfig, TextConfig

ATTENTION_IMPLS = ("sdpa", "eager")
MOE_IMPLS = ("grouped", "grouped_mm", "loop")


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a model computes (not what): kernels and batch invariance, fixed when the model is built."""

    attention: str = "sdpa"
    moe: str = "grouped_mm"
    invariant: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_IMPLS or self.moe not in MOE_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS} and moe one of {MOE_IMPLS}")
        if self.invariant and self.moe == "grouped_mm":
            raise ValueError("batch invariance needs the padded per-expert GEMMs: moe='grouped' (or 'loop')")

    @classmethod
    def for_serving(cls, device: torch.device | str) -> Execution:
        """The serving engine's options: batch-invariant per-expert GEMMs on CPU (where invariance is proven),
        batched sync-free kernels elsewhere."""
        if torch.device(device).type == "cpu":
            return cls(moe="grouped", invariant=True)
        return cls()


DEFAULT_EXECUTION = Execution()


def flush_subnormals_(probs: torch.Tensor, below: float = 2.0**-126) -> torch.Tensor:
    """Zero the entries of non-negative fp32 `probs` below `below` (default: the subnormals) in place. A peaked
    softmax is full of subnormals, and every CPU kernel that reads them (the products and quotients here, the
    self-conditioning GEMM) takes a slow path: measured 4-15x on [64, 32768]. Values this small change no sum,
    argmax or sample they enter. The test is an integer compare on the bits, which subnormals do not slow down."""
    if probs.dtype == torch.float32:
        limit = int(torch.tensor(below, dtype=torch.float32).view(torch.int32))
        probs.masked_fill_(probs.view(torch.int32) < limit, 0.0)
    return probs


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm in fp32, cast back to the input dtype; the weight multiplies directly (no `1 + w`, spec c.1)."""
    x32 = x.float()
    y = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps, self.weight)


def rope_inv_freq(geometry: LayerGeometry, params: dict) -> torch.Tensor:
    """Inverse frequencies of length head_dim/2 (spec c.1): default RoPE, or proportional with zero tail."""
    d, base = geometry.head_dim, float(params.get("rope_theta", 10_000.0))
    if params.get("rope_type", "default") == "proportional":
        n_rot = int(params.get("partial_rotary_factor", 1.0) * d // 2)
        rotated = 1.0 / base ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64, device="cpu").float() / d)
        inv = torch.cat([rotated, torch.zeros(d // 2 - n_rot, device="cpu")])
    else:  # always on the CPU, also while a model is built on meta (math on meta tensors imports torch's compiler)
        inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d)
    return inv / float(params.get("factor", 1.0))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin [B, S, 1, D] for positions [B, S]; angles in fp32, cast to the activation dtype."""
    freqs = positions[..., None].float() * inv_freq.float()  # [B, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # [B, S, 1, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX) RoPE on x [B, S, h, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attend_eager(q, k, v, allowed):
    """Reference attention: q [B,h,S,D], k/v [B,kv,T,D], allowed bool [B,1,S,T]; scale 1.0, fp32 softmax."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, h, T, D]
    scores = torch.matmul(q, k.transpose(-1, -2)).float()  # [B, h, S, T]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, v)  # [B, h, S, D]


def attend_sdpa(q, k, v, allowed):
    """Fused attention with the same semantics as `attend_eager`."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0, enable_gqa=k.shape[1] != q.shape[1])


ATTENTION = {"sdpa": attend_sdpa, "eager": attend_eager}
# Batch invariance of GEMMs (see `pad_rows`): MKL sgemm takes other code paths, with other rounding, for few rows
# (measured: < 4 with 1 thread, < 12 with 2); from 16 rows on a row's result does not depend on the row count or its
# place in the call (tests/test_engine.py checks it). Elementwise kernels round their scalar tail differently from
# their vector body, so a row count that is a multiple of 16 also keeps every element in the vector body.
INVARIANT_ROWS = 16


def pad_rows(x: torch.Tensor, multiple: int = INVARIANT_ROWS) -> torch.Tensor:
    """x [N, K] with zero rows appended up to a multiple of `multiple`, so a GEMM and the elementwise ops after it
    compute each row the same way whatever else shares the call (slice [:N] afterwards). CPU only: GPU libraries
    pick kernels by shape in ways padding does not pin down, and there the extra rows would only cost."""
    missing = -x.shape[0] % multiple
    if missing == 0 or x.device.type != "cpu":
        return x
    return torch.cat([x, x.new_zeros(missing, *x.shape[1:])])


def attend_rowwise(q, k, v, allowed, impl: str = "sdpa"):
    """Batch-invariant attention for padded rows: each row attends over only its own keys, exactly as it would
    alone (padding shifts where keys fall in the kernel's blocks and changes bits). A row whose valid keys are a
    suffix (left padding, the dynamic cache) is sliced; otherwise (a static cache's right-padded rows followed by
    the canvas) its valid keys are gathered, in order."""
    valid = allowed.any(dim=2)[:, 0]  # [B, T] keys some query of the row may see
    t, out = valid.shape[1], []
    counts = valid.sum(1).tolist()
    suffix = (valid[:, 1:] >= valid[:, :-1]).all(dim=1).tolist()
    for b, (n, is_suffix) in enumerate(zip(counts, suffix)):
        if is_suffix:
            s = t - n
            kb, vb, ab = k[b : b + 1, :, s:], v[b : b + 1, :, s:], allowed[b : b + 1, ..., s:]
        else:
            idx = valid[b].nonzero()[:, 0]
            kb, vb, ab = k[b : b + 1, :, idx], v[b : b + 1, :, idx], allowed[b : b + 1, ..., idx]
        out.append(ATTENTION[impl](q[b : b + 1], kb, vb, ab))
    return torch.cat(out)  # [B, h, S, D]


class Attention(nn.Module):
    """Self-attention of one layer; full layers have no v_proj (V is the raw k projection, spec c.2)."""

    def __init__(self, cfg: TextConfig, geometry: LayerGeometry):
        super().__init__()
        h, d, kv = cfg.num_attention_heads, geometry.head_dim, geometry.num_kv_heads
        self.n_heads, self.n_kv, self.head_dim, self.eps = h, kv, d, cfg.rms_norm_eps
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=False) if geometry.is_sliding else None
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def project(self, x: torch.Tensor, cos, sin):
        """q [B,h,S,D], k and v [B,kv,S,D] (k normed + rotated, v weightlessly normed)."""
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.n_heads, self.head_dim))  # [B, S, h, D]
        k_raw = self.k_proj(x).view(b, s, self.n_kv, self.head_dim)  # [B, S, kv, D]
        v_raw = self.v_proj(x).view(b, s, self.n_kv, self.head_dim) if self.v_proj is not None else k_raw
        q = apply_rope(q, cos, sin).transpose(1, 2)  # [B, h, S, D]
        k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)  # [B, kv, S, D]
        v = rms_norm(v_raw, self.eps).transpose(1, 2)  # [B, kv, S, D]
        return q, k, v

    def forward(self, x, cos, sin, allowed, past=None, impl: str = "sdpa", invariant: bool = False):
        """Attend over `past` keys (if any) then this call's own keys; returns (output, new k, new v)."""
        q, k, v = self.project(x, cos, sin)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        if invariant and q.shape[0] > 1:
            out = attend_rowwise(q, keys, values, allowed, impl)
        else:
            out = ATTENTION[impl](q, keys, values, allowed)  # [B, h, S, D]
        b, _, s, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), k, v


class MLP(nn.Module):
    """Gated GELU-tanh MLP (dense branch and self-conditioning)."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Router(nn.Module):
    """Softmax over all experts, top-k, renormalise, then per-expert scale (spec c.3)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.eps, self.top_k = cfg.rms_norm_eps, cfg.top_k_experts
        self.root = cfg.hidden_size**-0.5
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: torch.Tensor):
        """x [N, H] -> weights [N, K] fp32, expert ids [N, K]."""
        scores = self.proj(rms_norm(x, self.eps) * self.scale * self.root)  # [N, E]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)  # [N, K]
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    """Routed experts stored as 3-D tensors: gate_up_proj [E, 2I, H] (gate rows then up rows), down_proj [E, H, I]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.gelu(gate, approximate="tanh") * up, self.down_proj[e])

    reference_expert = expert  # a quantized subclass runs `expert` on its kernels and this on dequantized weights

    def forward(self, x, weights, idx, impl: str = "grouped"):
        if impl == "grouped_mm" and self.gate_up_proj.shape[-1] % 8 == 0 and self.down_proj.shape[-1] % 8 == 0:
            return self.grouped_mm(x, weights, idx)  # (its kernels need 16-byte aligned rows)
        return self.grouped(x, weights, idx) if impl == "grouped" else self.loop(x, weights, idx)

    def grouped_mm(self, x, weights, idx):
        """Sync-free: the N*K (token, slot) rows sorted by expert on the device, two `torch._grouped_mm` calls
        with cumulative row offsets (no host read, so a GPU step never waits on the CPU), then each token's K
        results summed in slot order (deterministic; no atomics)."""
        n, k = idx.shape
        flat = idx.reshape(-1)  # [N*K]
        order = torch.argsort(flat, stable=True)
        offsets = torch.cumsum(torch.bincount(flat, minlength=self.num_experts), 0).to(torch.int32)
        rows = x[order // k]  # [N*K, H]
        h = torch._grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs=offsets)  # [N*K, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(F.gelu(gate, approximate="tanh") * up, self.down_proj.transpose(1, 2), offs=offsets)
        y = y * weights.reshape(-1)[order, None].to(y.dtype)
        unsorted = torch.empty_like(y)
        unsorted[order] = y
        return unsorted.view(n, k, -1).sum(1).to(x.dtype)

    def grouped(self, x, weights, idx):
        """Sort the N*K assignments by expert once, run each hit expert on its tokens (one GEMM per expert, rows
        padded by `pad_rows` so a token's result does not depend on which other tokens share the call), and
        scatter-add back in expert order."""
        k = idx.shape[1]
        flat = idx.reshape(-1)  # [N*K]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens, w = order // k, weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                t = tokens[start : start + n]
                y = self.expert(e, pad_rows(x[t]))[:n] * w[start : start + n, None]
                out.index_add_(0, t, y.to(out.dtype))
                start += n
        return out

    def loop(self, x, weights, idx):
        """Slow twin: every (token, slot) pair on its own (through `reference_expert`)."""
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for slot in range(idx.shape[1]):
                y = self.reference_expert(int(idx[t, slot]), x[t : t + 1]) * weights[t, slot]
                out[t : t + 1] += y.to(out.dtype)
        return out


class DecoderLayer(nn.Module):
    """Attention + (dense MLP ∥ routed experts) with sandwich norms; residual scaled by a per-mode scalar (c.3)."""

    def __init__(self, cfg: TextConfig, geometry: LayerGeometry):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.geometry = geometry
        self.self_attn = Attention(cfg, geometry)
        self.mlp = MLP(h, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "pre_feedforward_layernorm_2",
            "post_feedforward_layernorm_1",
            "post_feedforward_layernorm_2",
        ):
            setattr(self, name, RMSNorm(h, eps))
        self.register_buffer("layer_scalar", torch.ones(1))  # decoder (denoise) mode
        self.register_buffer("encoder_layer_scalar", torch.ones(1))  # encoder (prefill/commit) mode

    def forward(
        self, x, cos, sin, allowed, past=None, decoder: bool = True, impl=("sdpa", "grouped"), invariant: bool = False
    ):
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, allowed, past, impl[0], invariant)
        r1 = x + self.post_attention_layernorm(attn)
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(r1)))
        flat = r1.reshape(-1, r1.shape[-1])  # [B*S, H]
        weights, idx = self.router(flat)  # router sees the raw residual, not a pre-norm output
        routed = self.experts(self.pre_feedforward_layernorm_2(flat), weights, idx, impl[1])
        routed = self.post_feedforward_layernorm_2(routed.view_as(r1))
        out = r1 + self.post_feedforward_layernorm(dense + routed)
        return out * (self.layer_scalar if decoder else self.encoder_layer_scalar), k, v


class TiedEmbedding(nn.Module):
    """The token embedding E [V, H], which is also the LM head and the self-conditioning mixer (spec c.5). The three
    products are methods so that a quantized embedding (`quantize.QuantEmbedding`) can replace this module."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """E[ids]: rows [..., H]."""
        return F.embedding(ids, self.weight)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] @ E^T -> [..., V] in the weight dtype."""
        return F.linear(hidden, self.weight)

    def mix(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [N, V] @ E -> [N, H]: probability-weighted sums of embedding rows."""
        return torch.matmul(rows, self.weight)


class SelfConditioning(nn.Module):
    """Maps the previous step's soft embedding to an additive input signal (spec c.5)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, soft: torch.Tensor) -> torch.Tensor:
        u = self.pre_norm(soft)
        return self.down_proj(F.gelu(self.gate_proj(u), approximate="tanh") * self.up_proj(u))


class DiffusionGemma(nn.Module):
    """Text stack of DiffusionGemmaForBlockDiffusion; the LM head is tied to `embed_tokens`."""

    def __init__(self, config: ModelConfig, execution: Execution = DEFAULT_EXECUTION):
        super().__init__()
        cfg = config.text
        self.config, self.text = config, cfg
        self.embed_tokens = TiedEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, g) for g in cfg.layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        for i, g in enumerate(cfg.layers):
            self.register_buffer(f"inv_freq_{i}", rope_inv_freq(g, cfg.rope_parameters[g.layer_type]), persistent=False)
        self._execution = execution

    @property
    def execution(self) -> Execution:
        return self._execution

    @property
    def batch_invariant(self) -> bool:
        return self._execution.invariant

    def with_execution(self, execution: Execution) -> DiffusionGemma:
        """A view of this model (the same weights, no copy) that computes with other execution options."""
        if execution == self._execution:
            return self
        view = copy.copy(self)  # shares _parameters, _buffers and _modules: only the options differ
        view._execution = execution
        return view

    # --- pieces -------------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the float weights'; a quantized embedding's codes are not it)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """E[ids] * sqrt(H), the scale rounded to the weight dtype as the reference does (53.0 in bf16)."""
        return self.embed_tokens(ids) * self._embed_scale()

    def _embed_scale(self) -> torch.Tensor:
        return torch.tensor(math.sqrt(self.text.hidden_size), dtype=torch.float32).to(self.dtype)

    def soft_embedding(self, sc_logits: torch.Tensor) -> torch.Tensor:
        """softmax_fp32(logits) @ E * sqrt(H): the self-conditioning input [B, C, H] from logits [B, C, V]."""
        probs = torch.softmax(sc_logits, dim=-1, dtype=torch.float32)
        if not probs.requires_grad:
            flush_subnormals_(probs)  # see soft_embedding_from_probs
        return self.soft_embedding_from_probs(probs)

    def soft_embedding_from_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """probs @ E * sqrt(H) for fp32 probabilities [B, C, V] (cast to the weight dtype first, as the reference);
        rows padded (`pad_rows`) so each row's result does not depend on the batch."""
        b, c, v = probs.shape
        rows = probs.reshape(b * c, v).to(self.dtype)
        # A peaked softmax is full of subnormal probabilities, and a CPU GEMM over subnormals runs ~15x slower
        # (measured: 220 vs 14 ms for [64, 32768] @ [32768, 512]). Their products are far below one ulp of any
        # output (the row sums to 1), so zeroing them leaves every output bit unchanged (tested). The sampler's
        # probabilities come flushed already (`sampler.flush_subnormals_`); a cast to bf16 can make new ones.
        if rows.dtype != probs.dtype:
            rows = rows.masked_fill(rows.abs() < torch.finfo(rows.dtype).tiny, 0.0)
        rows = pad_rows(rows)
        return (self.embed_tokens.mix(rows) * self._embed_scale())[: b * c].view(b, c, -1)  # [B, C, H]

    def soft_embedding_top_k(self, probs: torch.Tensor, k: int) -> torch.Tensor:
        """Fast-mode twin of `soft_embedding_from_probs`: only each row's k most probable tokens enter
        (sum_k p_k E[t_k] * sqrt(H), not renormalised), a gather of k embedding rows instead of a GEMM over V."""
        values, index = probs.topk(min(k, probs.shape[-1]), dim=-1)  # [B, C, k]
        rows = self.embed_tokens(index)  # [B, C, k, H]
        return torch.einsum("bck,bckh->bch", values.to(rows.dtype), rows) * self._embed_scale()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head, fp32, soft-capped. A non-fp32 model's head output is cast into the fp32 result chunk by
        chunk of rows, so no [B, S, V] temporary of its own dtype is held beside it."""
        head = self.embed_tokens.head
        if self.dtype == torch.float32 or hidden.requires_grad:
            out = head(hidden).float()  # [B, S, V]
        else:
            b, s, h = hidden.shape
            flat, v = hidden.reshape(b * s, h), self.text.vocab_size
            out = torch.empty(b * s, v, dtype=torch.float32, device=hidden.device)
            rows = max(INVARIANT_ROWS, (64 << 20) // (2 * v) // INVARIANT_ROWS * INVARIANT_ROWS)
            for i in range(0, b * s, rows):
                out[i : i + rows] = head(flat[i : i + rows])
            out = out.view(b, s, -1)
        cap = self.text.final_logit_softcapping
        if cap is None:
            return out
        if out.requires_grad:  # training
            return torch.tanh(out / cap) * cap
        return out.div_(cap).tanh_().mul_(cap)  # in place at inference: same bits, no [B, S, V] temporaries

    def rope(self, layer: int, positions: torch.Tensor, dtype: torch.dtype):
        return rope_cos_sin(positions, getattr(self, f"inv_freq_{layer}"), dtype)

    def new_cache(self, batch_size: int = 1, device=None) -> KVCache:
        w = self.text.sliding_window - 1
        shapes = [(g.num_kv_heads, g.head_dim) for g in self.text.layers]
        windows = [None if g.layer_type == FULL else w for g in self.text.layers]
        device = device or self.device
        return KVCache.empty(shapes, windows, batch_size, device, self.dtype)

    # --- modes --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, ids: torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Causal pass over ids [B, S] appended to `cache` (spec c.4). Returns final-normed hidden [B, S, H]."""
        if positions is None:
            positions = cache.length[:, None] + torch.arange(ids.shape[1], device=ids.device)  # [B, S]
        x = self.embed(ids)
        impl = (self._execution.attention, self._execution.moe)
        for i, layer in enumerate(self.layers):
            kpos = torch.cat([cache.positions[i], positions], dim=1)  # [B, T+S]
            allowed = _causal_allowed(
                positions, kpos, None if layer.geometry.layer_type == FULL else self.text.sliding_window
            )
            cos, sin = self.rope(i, positions, x.dtype)
            past = (cache.keys[i], cache.values[i])
            x, k, v = layer(x, cos, sin, allowed, past, decoder=False, impl=impl, invariant=self._execution.invariant)
            cache.append(i, k, v, positions)
        cache.length = positions[:, -1] + 1
        return self.norm(x)

    @torch.no_grad()
    def denoise(
        self,
        canvas: torch.Tensor,
        cache: KVCache,
        soft: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bidirectional pass over canvas [B, C] against `cache` (read-only). `soft`: the [B, C, H] self-conditioning
        input from `soft_embedding` (None or zeros on the first step). Returns fp32 logits [B, C, V] (spec c.5)."""
        if positions is None:
            positions = cache.length[:, None] + torch.arange(canvas.shape[1], device=canvas.device)  # [B, C]
        x = self.embed(canvas)
        if soft is not None:
            x = x + self.self_conditioning(soft)
        x = rms_norm(x, self.text.rms_norm_eps)  # weightless input post-norm, always applied
        impl = (self._execution.attention, self._execution.moe)
        canvas_ok = torch.ones_like(positions, dtype=torch.bool)
        for i, layer in enumerate(self.layers):
            # every canvas query sees all cached keys of this layer (sliding: the last W-1) + the whole canvas
            allowed = torch.cat([cache.positions[i] >= 0, canvas_ok], dim=1)[:, None, None, :]  # [B, 1, 1, T+C]
            cos, sin = self.rope(i, positions, x.dtype)
            past = (cache.keys[i], cache.values[i])
            x, _, _ = layer(x, cos, sin, allowed, past, decoder=True, impl=impl, invariant=self._execution.invariant)
        return self.logits(self.norm(x))

    def forward_masked(self, x: torch.Tensor, positions: torch.Tensor, allowed: list[torch.Tensor], decoder: bool):
        """Training entry: run all layers on input embeddings x [B, S, H] with explicit per-layer masks
        (bool [B, 1, S, S]) and no cache. Returns final-normed hidden [B, S, H]."""
        impl = (self._execution.attention, self._execution.moe)
        for i, layer in enumerate(self.layers):
            cos, sin = self.rope(i, positions, x.dtype)
            x, _, _ = layer(x, cos, sin, allowed[i], None, decoder=decoder, impl=impl)
        return self.norm(x)


def _causal_allowed(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """bool [B, 1, S, T]: key j visible to query i iff valid, j <= i and (sliding) j > i - W."""
    q, k = qpos[:, None, :, None], kpos[:, None, None, :]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= k > q - window
    return allowed
