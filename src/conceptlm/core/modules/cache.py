"""Explicit key/value cache for incremental decoding (re-exported by :mod:`.attention`)."""

from __future__ import annotations

import torch

__all__ = ["KVCache"]


class KVCache:
    """Explicit key/value cache for incremental decoding.

    Keys/values are stored per *layer index* as ``(B, Hkv, S, d)`` tensors and
    grown along ``S`` by :meth:`update`. Any subset of layers may be stored, so a
    cache can serve a slice of a decoder (``Decoder(..., layers=slice(a, b))``);
    one cache per slice or one shared cache both work because lengths are
    tracked per layer. ``memory`` holds precomputed cross-attention K/V per layer.
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.memory: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``/``v`` ``(B, Hkv, T, d)`` for ``layer_idx``; return all ``(B, Hkv, S, d)``."""
        if layer_idx in self.keys:
            k = torch.cat((self.keys[layer_idx], k), dim=2)
            v = torch.cat((self.values[layer_idx], v), dim=2)
        self.keys[layer_idx] = k
        self.values[layer_idx] = v
        return k, v

    def get(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Stored ``(k, v)`` for ``layer_idx`` or ``None``."""
        if layer_idx not in self.keys:
            return None
        return self.keys[layer_idx], self.values[layer_idx]

    def length(self, layer_idx: int | None = None) -> int:
        """Number of cached positions for ``layer_idx`` (default: the lowest stored layer; 0 if empty)."""
        if layer_idx is None:
            if not self.keys:
                return 0
            layer_idx = min(self.keys)
        k = self.keys.get(layer_idx)
        return 0 if k is None else k.shape[2]

    @property
    def layers(self) -> list[int]:
        """Sorted layer indices present in the cache."""
        return sorted(self.keys)

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` positions of every layer."""
        for i in list(self.keys):
            self.keys[i] = self.keys[i][:, :, :length]
            self.values[i] = self.values[i][:, :, :length]

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder batch rows (beam search): ``index`` is ``(B',)`` long."""
        for i in list(self.keys):
            self.keys[i] = self.keys[i].index_select(0, index)
            self.values[i] = self.values[i].index_select(0, index)
        for i, (k, v) in list(self.memory.items()):
            self.memory[i] = (k.index_select(0, index), v.index_select(0, index))

    def reset(self) -> None:
        """Drop everything."""
        self.keys.clear()
        self.values.clear()
        self.memory.clear()

    def __repr__(self) -> str:
        return f"KVCache(layers={self.layers}, length={self.length()}, memory_layers={sorted(self.memory)})"
