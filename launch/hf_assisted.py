"""The peer users reach for first: transformers' `generate(assistant_model=draft)`, measured like ours.

Same models, same prompts, same stop tokens; target forwards are counted with a forward hook so
its gen_rate (new tokens per target forward) is comparable with ours.
"""

from __future__ import annotations

import time

import torch

from specexec.drafter.session import GenerationResult, GenerationStats
from specexec.protocol.sampling import SamplingParams


def generate(target: torch.nn.Module, draft: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int,
             sampling: SamplingParams, stop_ids: frozenset[int]) -> GenerationResult:
    calls = []
    hook = target.register_forward_hook(lambda module, args, out: calls.append(time.perf_counter()))
    kwargs = dict(max_new_tokens=max_new_tokens, assistant_model=draft,
                  eos_token_id=sorted(stop_ids) or None, pad_token_id=min(stop_ids) if stop_ids else None,
                  repetition_penalty=sampling.repetition_penalty)
    if sampling.greedy:
        kwargs.update(do_sample=False)
    else:
        torch.manual_seed(sampling.seed)
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            out = target.generate(torch.tensor([prompt_ids]), **kwargs)
        wall = time.perf_counter() - start
    finally:
        hook.remove()
    new = out[0, len(prompt_ids):].tolist()
    stopped = bool(new) and new[-1] in stop_ids
    stats = GenerationStats("hf-assisted", 0, new_tokens=len(new), target_forwards=len(calls), wall_s=wall,
                            finish_reason="stop" if stopped else "length")
    return GenerationResult(list(prompt_ids), new, stats)
