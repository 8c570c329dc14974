from collections import Counter

import numpy as np
import pytest
import torch

from specexec.protocol.sampling import SamplingParams, target_distribution
from specexec.protocol.tree import ROOT, DraftTree
from stats_check import matches
from specexec.verifier.acceptance import walk

V = 6


def logits_table(seed):
    gen = torch.Generator().manual_seed(seed)
    return {node: torch.randn(V, generator=gen) * 1.5 for node in range(-1, 16)}


def test_greedy_walk_follows_argmax_and_emits_bonus():
    tree = DraftTree.build([2, 3, 4, 1], [-1, -1, 0, 2])
    table = {ROOT: torch.eye(V)[2], 0: torch.eye(V)[4], 2: torch.eye(V)[5], 1: torch.eye(V)[0]}
    res = walk(tree, table.__getitem__, SamplingParams(), "specexec", 10, 99, frozenset())
    assert (res.accepted, res.bonus, res.finished) == ([0, 2], 5, False)


def test_quota_and_stop_tokens_end_the_walk():
    tree = DraftTree.build([2, 4, 5], [-1, 0, 1])
    table = {ROOT: torch.eye(V)[2], 0: torch.eye(V)[4], 1: torch.eye(V)[5], 2: torch.eye(V)[1]}
    res = walk(tree, table.__getitem__, SamplingParams(), "specexec", 0, 2, frozenset())
    assert (res.accepted, res.bonus, res.finished) == ([0], 4, True)  # 2 tokens: node 0, then 4 as bonus
    res = walk(tree, table.__getitem__, SamplingParams(), "specexec", 0, 99, frozenset({4}))
    assert (res.accepted, res.bonus, res.finished) == ([0], 4, True)


def sampled_children(q, k, rng):
    """k distinct children drawn from q without replacement."""
    return rng.choice(len(q), size=k, replace=False, p=q).tolist()


@pytest.mark.parametrize("rule", ["specexec", "specinfer"])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.6, 0.9)])
def test_one_step_output_follows_the_target(rule, temperature, top_p):
    """The first emitted token is distributed as p, whatever children the draft proposes."""
    params = SamplingParams(temperature, top_p)
    table = logits_table(7)
    p = target_distribution(table[ROOT], params).numpy()
    q = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(9)), 0).double().numpy()
    rng = np.random.default_rng(0)
    counts, n = Counter(), 6000
    for seed in range(n):
        kids = sampled_children(q, 3, rng)
        q_ids = np.tile(np.arange(V, dtype=np.int32), (4, 1))
        q_probs = np.tile(q.astype(np.float32), (4, 1))
        tree = DraftTree.build(kids, [-1, -1, -1], q_ids, q_probs)
        res = walk(tree, table.__getitem__, SamplingParams(temperature, top_p, seed), rule, 0, 1, frozenset())
        counts[res.bonus] += 1
    ok, stat, crit = matches(counts, dict(enumerate(p)), n)
    assert ok, f"chi2 {stat:.1f} >= {crit:.1f}"


def test_the_check_has_power():
    """Accepting a proposed child whenever p(x) >= q(x) (a plausible bug) is caught by the same test."""
    table = logits_table(7)
    p = target_distribution(table[ROOT], SamplingParams(1.0)).numpy()
    q = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(9)), 0).double().numpy()
    rng = np.random.default_rng(0)
    counts, n = Counter(), 6000
    for _ in range(n):
        x = sampled_children(q, 1, rng)[0]
        counts[x if p[x] >= q[x] else int(rng.choice(V, p=p))] += 1
    assert not matches(counts, dict(enumerate(p)), n)[0]
