from collections import Counter

import numpy as np
import pytest
import torch

from known_draft import KnownDraft, known_logits
from specexec.drafter.sampled_tree import SampledTree, shape
from specexec.drafter.search_api import make_search
from specexec.drafter.tree_search import TreeConfig, TreeSearch
from specexec.protocol.sampling import SamplingParams
from specexec.protocol.tree import ROOT
from stats_check import matches

PROMPT = [3, 1, 4, 1, 5]
VOCAB = 24
HOT = SamplingParams(temperature=0.8, seed=4)


def grown(config, params=HOT, prompt=PROMPT):
    search = SampledTree(KnownDraft(VOCAB), config, params)
    search.start(list(prompt))
    search.grow()
    return search, search.tree()


def chains_of(tree):
    """Each root child's chain of tokens, in the order the root's children were sampled."""
    out = []
    for first in tree.children(ROOT):
        chain, node = [], first
        while True:
            chain.append(int(tree.tokens[node]))
            kids = tree.children(node)
            assert len(kids) <= 1, "below the root a chain never branches"
            if not kids:
                break
            node = kids[0]
        out.append(chain)
    return out


@pytest.mark.parametrize("budget, width, depth, expected", [
    (32, 4, 8, (4, 8)), (100, 4, 8, (4, 8)), (20, 4, 8, (4, 5)), (3, 4, 8, (3, 1)), (1, 16, 32, (1, 1)),
])
def test_the_budget_only_chooses_the_shape(budget, width, depth, expected):
    config = TreeConfig("specinfer", budget, branch_width=width, max_depth=depth)
    assert shape(config) == expected
    assert shape(TreeConfig("chain", budget, branch_width=width, max_depth=depth)) == (1, min(budget, depth))


@pytest.mark.parametrize("params", [HOT, SamplingParams()])
def test_the_tree_is_k_chains_of_depth_d_whatever_is_drawn(params):
    config = TreeConfig("specinfer", 10, branch_width=3, max_depth=4)
    shapes = set()
    for seed in range(20):
        _, sent = grown(config, SamplingParams(params.temperature, params.top_p, seed))
        tree = sent.tree
        tree.validate(VOCAB)  # also: every child has positive q under its parent when q is sent
        chains = chains_of(tree)
        assert [len(c) for c in chains] == [3, 3, 3]
        assert len({c[0] for c in chains}) == 3  # the root's children are distinct draws
        shapes.add(tuple(tree.parents.tolist()))
        assert sent.ranks == list(range(len(tree)))
    assert len(shapes) == 1  # the shape never depends on the tokens


def test_sampled_trees_carry_the_distributions_they_were_drawn_from():
    config = TreeConfig("specinfer", 6, branch_width=2, max_depth=3, q_support=10)
    _, sent = grown(config)
    tree = sent.tree
    assert tree.has_draft_probs and tree.q_ids.shape == (len(tree) + 1, 10)
    for node in [ROOT] + [n for n in range(len(tree)) if tree.children(n)]:
        context = PROMPT + [int(tree.tokens[i]) for i in tree.path_to(node)]
        q = torch.softmax(known_logits(context, VOCAB) / HOT.temperature, -1)
        top = torch.topk(q, 10)
        row = node + 1
        assert set(tree.q_ids[row].tolist()) == set(top.indices.tolist())
        assert np.allclose(tree.q_probs[row].sum(), 1, atol=1e-5)
        assert np.allclose(sorted(tree.q_probs[row]), sorted((top.values / top.values.sum()).numpy()), atol=1e-5)


def test_greedy_trees_are_sampled_at_temperature_one_and_carry_no_q():
    config = TreeConfig("specinfer", 8, branch_width=2, max_depth=4)
    a = grown(config, SamplingParams(seed=1))[1].tree
    b = grown(config, SamplingParams(seed=2))[1].tree
    assert not a.has_draft_probs
    assert chains_of(a) != chains_of(b)
    assert chains_of(a) == chains_of(grown(config, SamplingParams(seed=1))[1].tree)


def test_draws_follow_q_first_child_and_chain_step():
    """Root's first child ~ q(root); a chain's next token ~ q(its node): the laws the rule assumes."""
    config = TreeConfig("specinfer", 4, branch_width=2, max_depth=2, q_support=VOCAB)
    q_root = torch.softmax(known_logits(PROMPT, VOCAB) / HOT.temperature, -1).double()
    firsts, seconds, n = Counter(), Counter(), 3000
    for seed in range(n):
        chains = chains_of(grown(config, SamplingParams(HOT.temperature, 1.0, seed))[1].tree)
        firsts[chains[0][0]] += 1
        seconds[(chains[0][0], chains[0][1])] += 1
    assert matches(firsts, dict(enumerate(q_root.tolist())), n)[0]
    pairs = {}
    for t, pt in enumerate(q_root.tolist()):
        q_next = torch.softmax(known_logits(PROMPT + [t], VOCAB) / HOT.temperature, -1).double()
        pairs.update({(t, u): pt * pu for u, pu in enumerate(q_next.tolist())})
    assert matches(seconds, pairs, n)[0]


def test_reroot_commits_the_path_and_grows_from_the_bonus():
    config = TreeConfig("specinfer", 6, branch_width=2, max_depth=3, q_support=10)
    search, sent = grown(config)
    tree = sent.tree
    path = tree.path_to(tree.children(tree.children(tree.children(ROOT)[1])[0])[0])  # a whole chain
    search.reroot(sent, path, bonus=7)
    committed = PROMPT + [int(tree.tokens[i]) for i in path] + [7]
    assert search.draft.seq == committed and search.draft.n_slots == 0 and search.reused == 0
    search.grow()
    nxt = search.tree().tree
    nxt.validate(VOCAB)
    q = torch.softmax(known_logits(committed, VOCAB) / HOT.temperature, -1)
    assert set(nxt.q_ids[0].tolist()) == set(torch.topk(q, config.q_support).indices.tolist())
    assert not search.grow_beyond()


def test_one_draft_forward_per_level_below_the_root_children():
    config = TreeConfig("specinfer", 12, branch_width=3, max_depth=4)
    search = SampledTree(KnownDraft(VOCAB), config, HOT)
    search.start(PROMPT)
    search.grow()
    search.grow()  # growing twice in a round is a no-op
    assert search.draft.batches == [3, 3, 3]
    assert len(search.tree().tree) == 12


def test_a_smaller_budget_gives_a_smaller_shape():
    search, _ = grown(TreeConfig("specinfer", 12, branch_width=3, max_depth=4))
    search.reroot(search.tree(), [], bonus=2)
    search.set_budget(5)
    search.grow()
    assert [len(c) for c in chains_of(search.tree().tree)] == [1, 1, 1]


@pytest.mark.parametrize("method, params, kind", [
    ("specexec", HOT, TreeSearch), ("specexec", SamplingParams(), TreeSearch),
    ("specinfer", HOT, SampledTree), ("specinfer", SamplingParams(), SampledTree),
    ("chain", HOT, SampledTree), ("chain", SamplingParams(), TreeSearch),
])
def test_each_method_gets_its_search(method, params, kind):
    assert type(make_search(KnownDraft(VOCAB), TreeConfig(method, 8), params)) is kind


def test_the_best_first_search_refuses_sampled_trees():
    with pytest.raises(ValueError, match="make_search"):
        TreeSearch(KnownDraft(VOCAB), TreeConfig("specinfer", 8), SamplingParams())
    with pytest.raises(ValueError, match="make_search"):
        TreeSearch(KnownDraft(VOCAB), TreeConfig("chain", 8), HOT)
