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


class StaticCache:
    """The serving batch's KV cache: preallocated per-layer buffers for up to `rows` requests, so admitting a request
    copies its own prompt cache in (O(its cache)), finishing one moves the last row into its slot (O(one row)), and a
    denoise step reads rows [0, B) as views: nothing is re-stacked or re-padded per step. Full layers hold
    `capacity` keys per row (doubled when a row needs more: rare, amortised), sliding layers their window (W - 1)
    plus room for one encode call. Rows are left-aligned: row r holds n[l][r] keys in [0, n) of layer l, the rest
    has position -1 (right padding; `model.attend_rowwise` gathers each row's valid keys). The dynamic `KVCache` is
    its slow twin (tests compare them bit for bit)."""

    def __init__(self, template: KVCache, rows: int, capacity: int, extra: int):
        """`template`: any cache of the model (layer shapes, dtype, device, windows); `extra`: the most keys one
        encode call appends (the block / canvas length)."""
        self.rows, self.extra, self.windows = rows, extra, list(template.windows)
        self.device, self.dtype = template.keys[0].device, template.keys[0].dtype
        self.shapes = [(k.shape[1], k.shape[3]) for k in template.keys]
        self.capacity = capacity
        self.keys, self.values, self.positions = [], [], []
        for layer in range(len(self.shapes)):
            self._allocate(layer, self._size(layer))
        self.n = [[0] * rows for _ in self.shapes]  # keys held per layer and row (host ints: no device reads)
        self.length = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.used = 0  # rows [0, used) are live
        self._views: dict[int, CacheRow] = {}

    def _size(self, layer: int) -> int:
        w = self.windows[layer]
        return (self.capacity if w is None else w) + self.extra

    def _allocate(self, layer: int, size: int) -> None:
        n_kv, d = self.shapes[layer]
        k = torch.zeros(self.rows, n_kv, size, d, device=self.device, dtype=self.dtype)
        p = torch.full((self.rows, size), -1, dtype=torch.long, device=self.device)
        if layer < len(self.keys):  # growing: keep what is there
            old = self.keys[layer].shape[2]
            k[:, :, :old] = self.keys[layer]
            v = torch.zeros_like(k)
            v[:, :, :old] = self.values[layer]
            p[:, :old] = self.positions[layer]
            self.keys[layer], self.values[layer], self.positions[layer] = k, v, p
        else:
            self.keys.append(k)
            self.values.append(torch.zeros_like(k))
            self.positions.append(p)

    def _fit(self, need: int) -> None:
        """Grow the full layers so a row can hold `need` keys."""
        if need <= self.capacity:
            return
        while self.capacity < need:
            self.capacity *= 2
        for layer, w in enumerate(self.windows):
            if w is None:
                self._allocate(layer, self._size(layer))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # --- rows ---------------------------------------------------------------------------------------------------
    def admit(self, cache: KVCache) -> CacheRow:
        """Copy a single-row cache into the next free row and return that row's view."""
        if self.used == self.rows:
            raise RuntimeError(f"the static cache holds {self.rows} rows")
        r = self.used
        self._fit(max((k.shape[2] for k, w in zip(cache.keys, self.windows) if w is None), default=0))
        for layer in range(len(self.shapes)):
            n = cache.keys[layer].shape[2]
            self.keys[layer][r, :, :n] = cache.keys[layer][0]
            self.values[layer][r, :, :n] = cache.values[layer][0]
            self.positions[layer][r, :n] = cache.positions[layer][0]
            self.positions[layer][r, n:] = -1
            self.n[layer][r] = n
        self.length[r] = cache.length[0]
        self.used += 1
        return CacheRow(self, r)

    def release(self, row: CacheRow) -> CacheRow | None:
        """Free a row: the last live row moves into its slot (returned, with its slot updated), or None."""
        r, last = row.slot, self.used - 1
        self._views.pop(r, None)
        row.slot = -1
        self.used -= 1
        if r == last:
            return None
        for layer in range(len(self.shapes)):
            n = self.n[layer][last]
            self.keys[layer][r, :, :n] = self.keys[layer][last, :, :n]
            self.values[layer][r, :, :n] = self.values[layer][last, :, :n]
            self.positions[layer][r] = self.positions[layer][last]
            self.n[layer][r] = n
        self.length[r] = self.length[last]
        moved = self._views.pop(last)
        moved.slot = r
        self._views[r] = moved
        return moved

    def batch(self, count: int) -> KVCache:
        """Rows [0, count) as one cache for a denoise step: views, no copies (keys up to the longest row; shorter
        rows are padded with position -1)."""
        keys, values, positions = [], [], []
        for layer in range(len(self.shapes)):
            t = max(self.n[layer][:count])
            keys.append(self.keys[layer][:count, :, :t])
            values.append(self.values[layer][:count, :, :t])
            positions.append(self.positions[layer][:count, :t])
        return KVCache(keys, values, positions, list(self.windows), self.length[:count])


class CacheRow:
    """One row of a `StaticCache` with the single-row `KVCache` interface: reads are views, `append` writes in place
    (and shifts a sliding layer to its last W - 1 keys), so `model.encode` commits into the batch's own buffers."""

    def __init__(self, static: StaticCache, slot: int):
        self.static, self.slot = static, slot
        static._views[slot] = self
        self.windows = static.windows

    @property
    def keys(self) -> list[torch.Tensor]:
        s, r = self.static, self.slot
        return [k[r : r + 1, :, : s.n[i][r]] for i, k in enumerate(s.keys)]

    @property
    def values(self) -> list[torch.Tensor]:
        s, r = self.static, self.slot
        return [v[r : r + 1, :, : s.n[i][r]] for i, v in enumerate(s.values)]

    @property
    def positions(self) -> list[torch.Tensor]:
        s, r = self.static, self.slot
        return [p[r : r + 1, : s.n[i][r]] for i, p in enumerate(s.positions)]

    @property
    def length(self) -> torch.Tensor:
        return self.static.length[self.slot : self.slot + 1]

    @length.setter
    def length(self, value: torch.Tensor) -> None:
        self.static.length[self.slot] = value.reshape(-1)[0]

    @property
    def batch_size(self) -> int:
        return 1

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        s, r = self.static, self.slot
        n, add = s.n[layer][r], k.shape[2]
        if s.windows[layer] is None:
            s._fit(n + add)
        elif add > s.extra:
            raise ValueError(f"an encode call appends at most {s.extra} keys to a static cache, got {add}")
        keys, values, positions = s.keys[layer], s.values[layer], s.positions[layer]
        keys[r, :, n : n + add], values[r, :, n : n + add] = k[0], v[0]
        positions[r, n : n + add] = pos[0]
        n += add
        if (w := s.windows[layer]) is not None and n > w:  # keep the last W - 1, in order (as the dynamic cache)
            keys[r, :, :w] = keys[r, :, n - w : n].clone()
            values[r, :, :w] = values[r, :, n - w : n].clone()
            positions[r, :w] = positions[r, n - w : n].clone()
            positions[r, w:] = -1
            n = w
        s.n[layer][r] = n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def snapshot(self) -> KVCache:
        """A dynamic copy (what a prefix cache may keep: the row's buffers change)."""
        return KVCache(self.keys, self.values, self.positions, list(self.windows), self.length).clone()
