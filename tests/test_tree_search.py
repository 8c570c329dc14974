from dataclasses import replace

import numpy as np
import pytest

from specexec.drafter.tree_search import TreeConfig, TreeSearch
from known_draft import KnownDraft, oracle_top
from specexec.protocol.sampling import SamplingParams
from specexec.protocol.tree import ROOT

PROMPT = [3, 1, 4, 1, 5]
VOCAB = 24


def paths(tree):
    return {tuple(int(tree.tokens[i]) for i in tree.path_to(n)) for n in range(len(tree))}


def grown(config, params=SamplingParams(), prompt=PROMPT):
    """A search grown for one round; the oracle knows no n-gram nodes, so they are off."""
    search = TreeSearch(KnownDraft(VOCAB), replace(config, ngram=False), params)
    search.start(list(prompt))
    search.grow()
    return search, search.tree()


@pytest.mark.parametrize("budget", [1, 2, 5, 16, 40, 100, 256])
@pytest.mark.parametrize("beams, width, depth", [(1, 4, 32), (8, 6, 32), (64, 24, 32), (16, 3, 4)])
def test_specexec_tree_is_exact_top_budget(budget, beams, width, depth):
    config = TreeConfig("specexec", budget, max_n_beams=beams, branch_width=width, max_depth=depth)
    _, sent = grown(config)
    tree = sent.tree
    tree.validate(VOCAB)  # topological, siblings distinct, ids in range
    assert len(tree) <= budget
    assert paths(tree) == oracle_top(PROMPT, VOCAB, budget, width, depth)


def test_draft_temperature_follows_the_sampling_temperature():
    params = SamplingParams(temperature=0.5)
    config = TreeConfig("specexec", 30, max_n_beams=8, branch_width=5)
    _, sent = grown(config, params)
    assert paths(sent.tree) == oracle_top(PROMPT, VOCAB, 30, 5, 32, temperature=0.5)


@pytest.mark.parametrize("bonus_expanded", [True, False])
def test_reroot_gives_the_fresh_top_budget_with_or_without_reuse(bonus_expanded):
    config = TreeConfig("specexec", 20, max_n_beams=4, branch_width=5)
    search, sent = grown(config)
    tree = sent.tree
    # accept the first-child chain of depth 2, then a bonus that was (or was not) expanded
    a = tree.children(ROOT)[0]
    b = tree.children(a)[0]
    node_b = sent.nodes[b]
    expanded_children = [c for c in range(len(search.token)) if search.parent[c] == node_b
                         and search.slot[c] is not None]
    if bonus_expanded:
        assert expanded_children, "fixture: expected an expanded grandchild"
        bonus = search.token[expanded_children[0]]
    else:
        bonus = next(t for t in range(VOCAB) if (node_b, t) not in search.child_of)
    search.reroot(sent, [a, b], bonus)
    assert (search.reused > 0) == bonus_expanded
    search.grow()
    committed = PROMPT + [int(tree.tokens[a]), int(tree.tokens[b]), bonus]
    assert search.draft.seq == committed
    nxt = search.tree().tree
    nxt.validate(VOCAB)
    assert paths(nxt) == oracle_top(committed, VOCAB, 20, 5, 32)


def test_growth_beyond_budget_is_reused_and_stays_exact():
    config = TreeConfig("specexec", 12, max_n_beams=4, branch_width=4)
    search, sent = grown(config)
    for _ in range(6):
        assert search.grow_beyond()
    tree = sent.tree
    in_tree = set(sent.nodes)
    # a sent node with a child expanded past the budget: the walk stops there, the bonus is that child
    grown_past = [c for c in range(1, len(search.token))
                  if search.slot[c] is not None and c not in in_tree and search.parent[c] in in_tree]
    assert grown_past, "growing past the budget should expand children of sent nodes"
    child = grown_past[0]
    path = tree.path_to(sent.nodes.index(search.parent[child]))
    bonus = search.token[child]
    search.reroot(sent, path, bonus)
    assert search.reused > 0
    search.grow()
    committed = PROMPT + [int(tree.tokens[i]) for i in path] + [bonus]
    assert paths(search.tree().tree) == oracle_top(committed, VOCAB, 12, 4, 32)


def test_chain_is_one_path_of_budget_tokens():
    _, sent = grown(TreeConfig("chain", 7))
    tree = sent.tree
    assert len(tree) == 7
    assert tree.parents.tolist() == [-1, 0, 1, 2, 3, 4, 5]
    # greedy chain = the draft's argmax continuation
    assert paths(tree) == oracle_top(PROMPT, VOCAB, 7, 1, 32)


@pytest.mark.parametrize("method", ["specinfer", "chain"])
def test_sampled_trees_carry_their_draft_distributions(method):
    params = SamplingParams(temperature=0.8, top_p=1.0, seed=4)
    config = TreeConfig(method, 30, max_n_beams=8, branch_width=4, q_support=10)
    search, sent = grown(config, params)
    tree = sent.tree
    tree.validate(VOCAB)  # includes: every child has positive q under its parent
    assert tree.has_draft_probs and len(tree) <= 30
    assert np.allclose(tree.q_probs[[0] + [i + 1 for i in range(len(tree)) if tree.children(i)]].sum(1), 1, atol=1e-5)
    for node in [ROOT] + list(range(len(tree))):
        kids = tree.children(node)
        assert len(kids) <= (1 if method == "chain" else 4)
        # kept siblings are the first ones sampled: their search-node ids are consecutive from the first
        ids = [sent.nodes[k] for k in kids]
        if ids:
            parent_node = 0 if node == ROOT else sent.nodes[node]
            all_kids = sorted(c for c in range(len(search.token)) if search.parent[c] == parent_node)
            assert ids == all_kids[: len(ids)]


def test_sampled_children_differ_across_seeds():
    config = TreeConfig("specinfer", 6, branch_width=3)
    a = grown(config, SamplingParams(temperature=1.0, seed=1))[1].tree
    b = grown(config, SamplingParams(temperature=1.0, seed=2))[1].tree
    c = grown(config, SamplingParams(temperature=1.0, seed=1))[1].tree
    assert paths(a) == paths(c)
    assert paths(a) != paths(b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="beam"), "unknown method"),
    (dict(budget=0), "budget"),
    (dict(max_n_beams=0), "max_n_beams"),
    (dict(branch_width=0), "branch_width"),
])
def test_bad_config_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TreeConfig(**kwargs)
