"""Which keyword a transformers decoder takes its KV cache by.

transformers 5.x renamed `past_key_values` to `cache` (the old name still works but warns
"past_key_values is deprecated ... Use cache instead" on every forward); releases before the
rename only know `past_key_values`. Both model wrappers ask here once, at construction.
"""

from __future__ import annotations

import inspect

import torch


def cache_keyword(decoder: torch.nn.Module) -> str:
    """`cache` where `decoder.forward` declares it, else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
