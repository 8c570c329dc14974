"""A KV cache that grows in place: preallocated per-layer buffers with a write pointer.

transformers' DynamicLayer concatenates every forward's keys onto the whole cache (a full copy
per forward) and pruning by `index_select` copies it again. Here each layer owns buffers of
some capacity (doubled when full) and hands the model views of the filled part; `compact`
moves only the kept tree part down over what is dropped, leaving the committed prefix where
it is.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

MIN_CAPACITY = 256


class BufferLayer(DynamicLayer):
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0
        self._k = self._v = None

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, need: int) -> None:
        if self._k is not None and self._k.shape[-2] >= need:
            return
        cap = max(MIN_CAPACITY, need, 2 * (self._k.shape[-2] if self._k is not None else 0))
        k = key_states.new_empty(*key_states.shape[:-2], cap, key_states.shape[-1])
        v = value_states.new_empty(*value_states.shape[:-2], cap, value_states.shape[-1])
        if self.length:
            k[..., :self.length, :] = self._k[..., :self.length, :]
            v[..., :self.length, :] = self._v[..., :self.length, :]
        self._k, self._v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._reserve(key_states, value_states, self.length + n)
        self._k[..., self.length:self.length + n, :] = key_states
        self._v[..., self.length:self.length + n, :] = value_states
        self.length += n
        self._expose()
        return self.keys, self.values

    def _expose(self) -> None:
        self.keys = self._k[..., :self.length, :]
        self.values = self._v[..., :self.length, :]

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def compact(self, start: int, keep: torch.Tensor) -> None:
        """Positions [0, start) stay in place; positions `start + keep` (ascending) move to follow them."""
        if not self.is_initialized:
            return
        n = len(keep)
        moved = start + keep.to(self._k.device)
        self._k[..., start:start + n, :] = self._k.index_select(-2, moved)
        self._v[..., start:start + n, :] = self._v.index_select(-2, moved)
        self.length = start + n
        self._expose()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        if self.is_initialized:
            self.length += tokens_to_remove
            self._expose()

    def reset(self) -> None:
        super().reset()
        self.length, self._k, self._v = 0, None, None


class BufferCache(Cache):
    """A cache of BufferLayers, one per decoder layer (created as the model first writes them)."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=BufferLayer)

    def compact(self, start: int, keep: list[int]) -> None:
        idx = torch.as_tensor(keep, dtype=torch.long)
        with torch.inference_mode():  # the buffers were made under it (the forwards)
            for layer in self.layers:
                layer.compact(start, idx)
