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


@pytest.mark.parametrize("budget", [5, 16, 40])
def test_depth_decay_gives_the_top_budget_by_decayed_score(budget):
    config = TreeConfig("specexec", budget, max_n_beams=8, branch_width=6, depth_decay=0.5)
    _, sent = grown(config)
    expected = oracle_top(PROMPT, VOCAB, budget, 6, 32, decay=0.5)
    assert paths(sent.tree) == expected
    assert expected != oracle_top(PROMPT, VOCAB, budget, 6, 32), "fixture: decay must change the tree"
    assert max(len(p) for p in expected) < max(len(p) for p in oracle_top(PROMPT, VOCAB, budget, 6, 32))


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


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="beam"), "unknown method"),
    (dict(budget=0), "budget"),
    (dict(max_n_beams=0), "max_n_beams"),
    (dict(branch_width=0), "branch_width"),
    (dict(depth_decay=0.0), "depth_decay"),
    (dict(depth_decay=1.5), "depth_decay"),
])
def test_bad_config_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TreeConfig(**kwargs)


@pytest.mark.parametrize("budget", [8, 16, 64, 256])
def test_few_expansions_per_node_sent(budget):
    """Leaves are sent unexpanded, and a forward is never wider than the budget can use."""
    search, sent = grown(TreeConfig("specexec", budget))
    assert len(sent.nodes) == budget
    assert search.expansions <= 1.45 * budget  # this draft is near uniform: a worst case
    one_by_one, _ = grown(TreeConfig("specexec", budget, max_n_beams=1))
    assert one_by_one.expansions < budget  # best-first one node at a time wastes nothing
    assert search.draft.forwards < one_by_one.draft.forwards or budget < 16


def test_the_whole_subtree_is_carried_and_only_new_nodes_cost_forwards():
    config = TreeConfig("specexec", 24, max_n_beams=4, branch_width=5)
    search, sent = grown(config)
    tree = sent.tree
    a = tree.children(ROOT)[0]
    node_a = sent.nodes[a]
    child = next(c for c in search.kids[node_a] if search.slot[c] is not None)  # an expanded child of a
    under = [n for n in range(len(search.token)) if n != child and _descends(search, n, child)]
    search.reroot(sent, [a], search.token[child])
    assert search.reused == len(under) > 0
    assert any(search.slot[n] is None for n in range(1, len(search.token)))  # unexpanded nodes too
    before = search.expansions
    search.grow()
    committed = PROMPT + [int(tree.tokens[a]), search.token[0]]
    assert search.draft.seq == committed
    assert paths(search.tree().tree) == oracle_top(committed, VOCAB, 24, 5, 32)
    fresh, _ = grown(config, prompt=committed)
    assert search.expansions - before < fresh.expansions


def _descends(search, node, ancestor):
    while node not in (ancestor, 0):
        node = search.parent[node]
    return node == ancestor


def test_overlap_counts_only_the_nodes_grown_after_the_tree_was_sent():
    config = TreeConfig("specexec", 64, branch_width=4, overlap_beams=4, overlap_extra=10)
    search, _ = grown(config)
    before = search.expansions
    while search.grow_beyond():
        pass
    assert search.expansions - before == 10  # however far the main search went past the budget


def test_depth_cap_sizes_the_last_rounds():
    search = TreeSearch(KnownDraft(VOCAB), TreeConfig("specexec", 30, branch_width=5, ngram=False), SamplingParams())
    search.start(PROMPT)
    search.limit_depth(2)
    search.grow()
    tree = search.tree().tree
    assert tree.depths().max() <= 2
    assert paths(tree) == oracle_top(PROMPT, VOCAB, 30, 5, 2)


def test_skipped_tokens_are_caught_up_before_the_next_tree():
    config = TreeConfig("specexec", 12, branch_width=4, ngram=False)
    search, sent = grown(config)
    search.skip([7])
    search.skip([9])
    search.grow()
    assert search.draft.seq == PROMPT + [7, 9]
    assert paths(search.tree().tree) == oracle_top(PROMPT + [7, 9], VOCAB, 12, 4, 32)


def test_ngram_nodes_are_free_distinct_and_merged():
    """The continuation of the text's suffix found earlier hangs under the root as a chain with
    no draft forward; where the draft proposed the same token it is the same node."""
    prompt = [2, 9, 11, 13, 17, 19, 5, 2, 9, 11]  # "2 9 11" occurred before, followed by 13 17 19 5
    search = TreeSearch(KnownDraft(VOCAB), TreeConfig("specexec", 4, branch_width=4, ngram=True, ngram_tokens=4), SamplingParams())
    search.start(prompt)
    search.grow()
    sent = search.tree()
    sent.tree.validate(VOCAB)  # siblings distinct
    node, chain = 0, []
    for t in (13, 17, 19, 5):
        node = search.child_of[(node, t)]
        chain.append(node)
    assert search.slot[chain[-1]] is None  # the chain's end was never run through the draft
    plain = TreeSearch(KnownDraft(VOCAB), TreeConfig("specexec", 4, branch_width=4, ngram=False), SamplingParams())
    plain.start(prompt)
    plain.grow()
    draft_kids = {plain.token[c] for c in plain.kids[0]}
    assert {search.token[c] for c in search.kids[0]} == draft_kids | {13}
    wide = TreeSearch(KnownDraft(VOCAB), TreeConfig("specexec", 40, branch_width=4, ngram=True, ngram_tokens=4), SamplingParams())
    wide.start(prompt)
    wide.grow()
    assert (13, 17, 19, 5) in paths(wide.tree().tree)


def _verdict(sent, committed, noise=1.5):
    """Greedy verification by a target that is the known draft plus noise: (accepted path, bonus)."""
    from known_draft import known_logits
    tree, path, context = sent.tree, [], list(committed)
    while True:
        logits = known_logits(context, VOCAB) + noise * known_logits(context + [VOCAB], VOCAB)
        token = int(logits.argmax())
        node = next((i for i in range(len(tree)) if int(tree.parents[i]) == (path[-1] if path else ROOT)
                     and int(tree.tokens[i]) == token), None)
        if node is None:
            return path, token
        path.append(node)
        context.append(token)


def _carried_after_overlap(depth_weight, prompt):
    config = TreeConfig("specexec", 12, max_n_beams=4, branch_width=4, overlap_beams=4, overlap_extra=48,
                        overlap_depth_weight=depth_weight)
    search, sent = grown(config, prompt=prompt)
    while search.grow_beyond():
        pass
    path, bonus = _verdict(sent, prompt)
    search.reroot(sent, path, bonus)
    return sum(s is not None for s in search.slot[1:])  # expanded nodes carried into the next round


def test_overlap_grows_under_the_likely_next_roots():
    """Past the budget, the draft's forwards go where the verdict is likely to land: more of them
    are carried into the next round than with plain best-first growth (weight 1)."""
    prompts = [[(5 * i + j) % VOCAB for j in range(4 + i % 3)] for i in range(40)]
    towards_verdicts = sum(_carried_after_overlap(0.3, p) for p in prompts)
    best_first = sum(_carried_after_overlap(1.0, p) for p in prompts)
    assert towards_verdicts > 1.2 * best_first, (towards_verdicts, best_first)


def test_a_deadline_sends_the_best_nodes_found_so_far():
    config = TreeConfig("specexec", 40, max_n_beams=4, branch_width=4, ngram=False)
    search = TreeSearch(KnownDraft(VOCAB), config, SamplingParams())
    search.start(PROMPT)
    before = search.draft.forwards
    search.grow(deadline=0.0)  # long past: one forward, then the tree goes out
    assert search.draft.forwards - before == 1
    sent = search.tree()
    sent.tree.validate(VOCAB)
    assert len(sent.tree) == min(40, len(search.token) - 1) == 20  # 4 root children, 4 x 4 below
    discovered = sorted(range(1, len(search.token)), key=lambda n: (-search.score[n], n))[:40]
    assert sorted(sent.nodes) == sorted(discovered)  # the best discovered, closed under ancestors
    assert paths(sent.tree) != oracle_top(PROMPT, VOCAB, 40, 4, 32)  # not yet the certified tree
