"""Pruning a transformers KV cache by gathering along the sequence axis.

Both sides end a round the same way (DESIGN.md, "One round", steps 4 and 5): keep the committed
prefix plus the accepted path, drop every other tree node. That is one `index_select` on each
layer's keys and values, so the rule lives here, next to the tree it prunes.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length() if len(cache.layers) else 0


def gather_cache(cache: DynamicCache, keep: torch.Tensor | list[int]) -> None:
    """Keep only the sequence positions `keep` (in that order) in every layer, in place."""
    if not len(cache.layers):
        return
    keep = torch.as_tensor(keep, dtype=torch.long)
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or not layer.keys.numel():
            continue
        idx = keep.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, idx)
        layer.values = layer.values.index_select(-2, idx)


def keep_prefix_and(prefix_len: int, extra: list[int]) -> torch.Tensor:
    """Positions [0, prefix_len) followed by the positions in `extra`."""
    return torch.cat([torch.arange(prefix_len), torch.as_tensor(extra, dtype=torch.long)])
