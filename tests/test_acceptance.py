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


def first_tokens(table, q, rng, rule, params_for_seed, seen=None, n=6000) -> Counter:
    """The first emitted token over `n` seeded walks of a root with 3 children sampled from q."""
    counts = Counter()
    for seed in range(n):
        kids = sampled_children(q, 3, rng)
        q_ids = np.tile(np.arange(V, dtype=np.int32), (4, 1))
        q_probs = np.tile(q.astype(np.float32), (4, 1))
        tree = DraftTree.build(kids, [-1, -1, -1], q_ids, q_probs)
        extra = () if seen is None else (seen,)
        counts[walk(tree, table.__getitem__, params_for_seed(seed), rule, 0, 1, frozenset(), *extra).bonus] += 1
    return counts


@pytest.mark.parametrize("rule", ["specexec", "specinfer"])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.6, 0.9)])
def test_one_step_output_follows_the_target(rule, temperature, top_p):
    """The first emitted token is distributed as p, whatever children the draft proposes."""
    params = SamplingParams(temperature, top_p)
    table = logits_table(7)
    p = target_distribution(table[ROOT], params).numpy()
    q = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(9)), 0).double().numpy()
    counts, n = first_tokens(table, q, np.random.default_rng(0), rule,
                             lambda seed: SamplingParams(temperature, top_p, seed)), 6000
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


def test_repetition_penalty_sees_the_committed_tokens_and_the_path():
    """Root: token 2 leads 3.0 to 2.9, but 2 was committed; at node 0 (token 3) token 3 leads 2.0 to
    1.8, but 3 is on the path. Penalized, the walk takes 3 then 5; plain, it emits 2."""
    tree = DraftTree.build([3], [-1])
    table = {ROOT: torch.tensor([0, 0, 3.0, 2.9, 0, 0]), 0: torch.tensor([0, 0, 0, 2.0, 0, 1.8])}
    seen = torch.zeros(V, dtype=torch.bool)
    seen[2] = True
    res = walk(tree, table.__getitem__, SamplingParams(repetition_penalty=1.3), "specexec", 0, 9, frozenset(), seen)
    assert (res.accepted, res.bonus) == ([0], 5) and seen.sum() == 1  # the caller's mask is left alone
    res = walk(tree, table.__getitem__, SamplingParams(), "specexec", 0, 9, frozenset(), seen)
    assert (res.accepted, res.bonus) == ([], 2)
    with pytest.raises(ValueError, match="committed tokens"):
        walk(tree, table.__getitem__, SamplingParams(repetition_penalty=1.3), "specexec", 0, 9, frozenset())


@pytest.mark.parametrize("rule", ["specexec", "specinfer"])
def test_one_step_output_follows_the_penalized_target(rule):
    from specexec.protocol.sampling import penalize
    params = SamplingParams(0.8, repetition_penalty=1.5)
    table = logits_table(5)
    seen = torch.tensor([True, False, False, True, False, True])
    p = target_distribution(penalize(table[ROOT], seen, 1.5), params).numpy()
    q = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(9)), 0).double().numpy()
    counts, n = first_tokens(table, q, np.random.default_rng(1), rule,
                             lambda seed: SamplingParams(0.8, seed=seed, repetition_penalty=1.5), seen), 6000
    ok, stat, crit = matches(counts, dict(enumerate(p)), n)
    assert ok, f"chi2 {stat:.1f} >= {crit:.1f}"
    plain = target_distribution(table[ROOT], params).numpy()
    assert not matches(counts, dict(enumerate(plain)), n)[0]  # the penalty changed the distribution
