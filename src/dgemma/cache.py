"""Key/value cache for the causal encoder passes (spec c.4), and batching of several caches for one denoise step.

Each layer keeps keys, values and the absolute position of every key ([B, T_l]; -1 marks left padding), so masks
are derived from positions alone. Sliding layers keep only their last `W - 1` keys, as the reference DynamicCache
does. The decoder only reads a cache; it never writes one. No model math lives here.
"""

from __future__ import annotations

import dataclasses

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
