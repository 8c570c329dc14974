"""Acceptance: walk the tree with the target's distributions and emit what the target would.

SpecExec rule (DESIGN.md): at node v draw x ~ p(.|v); move into the child carrying x, or emit x
as the bonus. One keyed uniform per emitted token, so the output is plain sampling from the
target whatever the tree. SpecInfer rule: try v's children in the order they were sampled from
the draft q without replacement; accept child x with probability min(1, p(x)/q(x)), otherwise
p <- norm(max(p - q, 0)) and q loses x; if every child is rejected, draw the bonus from p.
At temperature 0 both rules reduce to following the target's argmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from specexec.protocol.sampling import SamplingParams, emit, sample, target_distribution, uniform
from specexec.protocol.tree import ROOT, DraftTree

RULES = ("specexec", "specinfer")


@dataclass(frozen=True)
class WalkResult:
    accepted: list[int]  # tree node indices from the root's child down
    bonus: int  # the last emitted token; never a tree node
    finished: bool  # a stop token was emitted or the quota is used up


def walk(tree: DraftTree, logits_at: Callable[[int], torch.Tensor], params: SamplingParams,
         rule: str, position: int, quota: int, stop_ids: frozenset[int]) -> WalkResult:
    """Walk from the root emitting at most `quota` tokens; the first lands at `position`."""
    if quota < 1:
        raise ValueError("quota must be at least 1")
    choose = _specinfer_step if rule == "specinfer" and not params.greedy else _specexec_step
    node, accepted = ROOT, []
    while True:
        x, child = choose(tree, node, logits_at(node), params, position + len(accepted))
        last = x in stop_ids or len(accepted) + 1 >= quota
        if child is None or last:
            return WalkResult(accepted, x, last)
        accepted.append(child)
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
