"""Acceptance: walk the tree with the target's distributions and emit what the target would.

SpecExec rule (DESIGN.md): at node v draw x ~ p(.|v); move into the child carrying x, or emit x
as the bonus. One keyed uniform per emitted token, so the output is plain sampling from the
target whatever the tree. SpecInfer rule: try v's children in the order they were sampled from
the draft q without replacement; accept child x with probability min(1, p(x)/q(x)), otherwise
p <- norm(max(p - q, 0)) and q loses x; if every child is rejected, draw the bonus from p.
At temperature 0 both rules reduce to following the target's argmax.

A repetition penalty is applied to the target's logits at each node with that node's context: the
committed tokens (`seen`) plus the tokens on the path down to it, which is what plain decoding
would have seen at that position, so the walk stays lossless with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from specexec.protocol.sampling import SamplingParams, emit, penalize, sample, target_distribution, uniform
from specexec.protocol.tree import ROOT, DraftTree

RULES = ("specexec", "specinfer")


@dataclass(frozen=True)
class WalkResult:
    accepted: list[int]  # tree node indices from the root's child down
    bonus: int  # the last emitted token; never a tree node
    finished: bool  # a stop token was emitted or the quota is used up


def walk(tree: DraftTree, logits_at: Callable[[int], torch.Tensor], params: SamplingParams,
         rule: str, position: int, quota: int, stop_ids: frozenset[int],
         seen: torch.Tensor | None = None) -> WalkResult:
    """Walk from the root emitting at most `quota` tokens; the first lands at `position`.
    `seen`: bool [V] mask of the committed tokens, needed when params.repetition_penalty != 1."""
    if quota < 1:
        raise ValueError("quota must be at least 1")
    if params.repetition_penalty != 1.0 and seen is None:
        raise ValueError("a repetition penalty needs the committed tokens (seen)")
    choose = _specinfer_step if rule == "specinfer" and not params.greedy else _specexec_step
    seen = None if params.repetition_penalty == 1.0 else seen.clone()
    node, accepted = ROOT, []
    while True:
        logits = penalize(logits_at(node), seen, params.repetition_penalty)
        x, child = choose(tree, node, logits, params, position + len(accepted))
        last = x in stop_ids or len(accepted) + 1 >= quota
        if child is None or last:
            return WalkResult(accepted, x, last)
        accepted.append(child)
        if seen is not None:
            seen[x] = True
        node = child


def _specexec_step(tree, node, logits, params, position):
    x = emit(logits, params, position)
    return x, tree.child_with_token(node, x)


def _specinfer_step(tree, node, logits, params, position):
    p = target_distribution(logits, params)
    children = tree.children(node)
    if children:
        q = tree.draft_distribution(node, p.numel())
        q /= q.sum()
        for draw, child in enumerate(children, start=1):
            x = int(tree.tokens[child])
            if uniform(params.seed, position, draw) * q[x] < p[x]:  # u < p(x)/q(x)
                return x, child
            residual = torch.clamp(p - q, min=0)
            if residual.sum() > 0:
                p = residual / residual.sum()
            q[x] = 0
            if q.sum() <= 0:
                break
            q /= q.sum()
    return sample(p, uniform(params.seed, position, 0)), None
