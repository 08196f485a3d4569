"""Key/value cache for the causal encoder passes (spec c.4), batching of several caches for one denoise step, and
the multi-turn prefix cache.

Each layer keeps keys, values and the absolute position of every key ([B, T_l]; -1 marks left padding), so masks
are derived from positions alone. Sliding layers keep only their last `W - 1` keys, as the reference DynamicCache
does. The decoder only reads a cache; it never writes one. `append` never writes into an existing tensor (it
concatenates), so a snapshot that shares the tensors of a cache stays valid while that cache grows. No model math
lives here.

`PrefixCache` keeps snapshots of prompt caches at block boundaries (multiples of `block` tokens) in an LRU bounded
by bytes. A prompt is encoded in block-aligned chunks whenever a prefix cache is in use, hit or miss, so reusing the
first k blocks replays exactly the computation a cold prefill makes: the output is bit for bit the same with and
without reuse. Full layers keep every key and sliding layers their last W - 1 at the boundary, which is all that
the positions after it can see.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import torch


@dataclasses.dataclass
class KVCache:
    """Per-layer K/V of the prompt and every committed canvas. Rows of a batch may have different lengths."""

    keys: list[torch.Tensor]  # per layer [B, n_kv, T_l, D]
    values: list[torch.Tensor]  # per layer [B, n_kv, T_l, D]
    positions: list[torch.Tensor]  # per layer [B, T_l], -1 = padding
    windows: list[int | None]  # keys kept per layer (W - 1 for sliding layers, None = all)
    length: torch.Tensor  # [B] number of positions written per row (= next position)

    @classmethod
    def empty(cls, layer_shapes, windows, batch_size: int, device, dtype) -> KVCache:
        """`layer_shapes`: (n_kv, head_dim) per layer."""
        kv = [torch.zeros(batch_size, n, 0, d, device=device, dtype=dtype) for n, d in layer_shapes]
        pos = [torch.zeros(batch_size, 0, dtype=torch.long, device=device) for _ in layer_shapes]
        length = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cls(kv, [t.clone() for t in kv], pos, list(windows), length)

    @property
    def batch_size(self) -> int:
        return self.length.shape[0]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Add new keys (k, v: [B, n_kv, S, D], pos: [B, S]) to one layer, trimming sliding layers."""
        keys = torch.cat([self.keys[layer], k], dim=2)
        values = torch.cat([self.values[layer], v], dim=2)
        positions = torch.cat([self.positions[layer], pos], dim=1)
        if (w := self.windows[layer]) is not None and keys.shape[2] > w:
            keys, values, positions = keys[:, :, -w:], values[:, :, -w:], positions[:, -w:]
        self.keys[layer], self.values[layer], self.positions[layer] = keys, values, positions

    def clone(self) -> KVCache:
        return KVCache(
            [t.clone() for t in self.keys],
            [t.clone() for t in self.values],
            [t.clone() for t in self.positions],
            list(self.windows),
            self.length.clone(),
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def snapshot(self) -> KVCache:
        """A cache equal to this one now, sharing its tensors (see the module docstring): O(layers), no copy."""
        return KVCache(
            list(self.keys), list(self.values), list(self.positions), list(self.windows), self.length.clone()
        )


class PrefixCache:
    """Prompt caches by token prefix at block boundaries, least recently used evicted past `max_bytes` (0: nothing
    is kept, but prompts are still encoded in blocks, so outputs do not depend on the setting). Thread-safe."""

    def __init__(self, max_bytes: int, block: int):
        if block < 1 or max_bytes < 0:
            raise ValueError(f"block must be >= 1 and max_bytes >= 0, got {block}, {max_bytes}")
        self.max_bytes, self.block = max_bytes, block
        self._entries: collections.OrderedDict[tuple[int, ...], tuple[KVCache, int]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.reused_tokens = 0

    def lookup(self, ids: list[int] | tuple[int, ...]) -> tuple[int, KVCache | None]:
        """(n, cache of ids[:n]) for the longest stored block-aligned prefix, or (0, None)."""
        ids = tuple(ids)
        with self._lock:
            for n in range(len(ids) // self.block * self.block, 0, -self.block):
                entry = self._entries.get(ids[:n])
                if entry is not None:
                    self._entries.move_to_end(ids[:n])
                    self.hits += 1
                    self.reused_tokens += n
                    return n, entry[0].snapshot()
            self.misses += 1
        return 0, None

    def store(self, ids: tuple[int, ...], cache: KVCache) -> None:
        """Keep `cache` (a single-row cache of exactly `ids`, len(ids) a multiple of the block)."""
        assert len(ids) % self.block == 0 and int(cache.length[0]) == len(ids)
        size = cache.nbytes()
        if size > self.max_bytes:
            return
        with self._lock:
            if ids in self._entries:
                self._entries.move_to_end(ids)
                return
            self._entries[ids] = (cache.snapshot(), size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self.bytes -= freed

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self.bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "reused_tokens": self.reused_tokens,
            }


def stack_caches(caches: list[KVCache]) -> KVCache:
    """Concatenate single- or multi-row caches along the batch, left-padding shorter rows (positions -1)."""
    if len(caches) == 1:
        return caches[0]
    n_layers = len(caches[0].keys)
    keys, values, positions = [], [], []
    for layer in range(n_layers):
        t_max = max(c.keys[layer].shape[2] for c in caches)
        keys.append(torch.cat([_left_pad(c.keys[layer], t_max, 2, 0) for c in caches]))
        values.append(torch.cat([_left_pad(c.values[layer], t_max, 2, 0) for c in caches]))
        positions.append(torch.cat([_left_pad(c.positions[layer], t_max, 1, -1) for c in caches]))
    length = torch.cat([c.length for c in caches])
    return KVCache(keys, values, positions, list(caches[0].windows), length)


def _left_pad(t: torch.Tensor, size: int, dim: int, value: float) -> torch.Tensor:
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.full(shape, value, dtype=t.dtype, device=t.device), t], dim=dim)
