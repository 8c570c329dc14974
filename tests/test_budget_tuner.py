import pytest

from specexec.drafter.budget_tuner import (BudgetEstimate, BudgetTuners, WarmupRound, accepted_within, choose,
                                           estimate, explain, interpolate)
from specexec.drafter.session import RunOptions


def test_interpolation():
    curve = {1: 1.0, 4: 2.0, 16: 5.0}
    assert interpolate(curve, 1) == 1.0 and interpolate(curve, 2.5) == pytest.approx(1.5)
    assert interpolate(curve, 10) == pytest.approx(3.5) and interpolate(curve, 28) == pytest.approx(8.0)


def test_accepted_path_is_cut_at_the_first_node_outside_the_budget():
    assert accepted_within((0, 1, 5, 2), 1) == 1
    assert accepted_within((0, 1, 5, 2), 5) == 2
    assert accepted_within((0, 1, 5, 2), 6) == 4


def test_tuner_picks_the_argmax_of_its_model_on_a_synthetic_curve():
    # warm-up: a chain whose node of rank r sits at depth r+1; the path accepts ranks 0..9
    rounds = [WarmupRound(tuple(range(10)), tuple(range(64)), tuple(r + 1 for r in range(64)))] * 3
    target = {1: 0.20, 4: 0.21, 16: 0.30, 64: 0.90, 256: 3.5}  # flat, then linear: a CPU-like curve
    draft = {1: 0.05, 4: 0.055, 16: 0.08, 64: 0.2}
    budgets = (1, 2, 4, 8, 16, 32, 64)
    estimates = estimate(rounds, target, draft, budgets)
    best = choose(estimates)
    by_hand = {}
    for b in budgets:
        g = 1 + min(b, 10)
        depth = min(b, 64)
        d = (depth + 1) * interpolate(draft, b / depth)
        by_hand[b] = g / (d + interpolate(target, b + 1))
    assert best.budget == max(by_hand, key=by_hand.get)
    assert best.tokens_per_s == pytest.approx(by_hand[best.budget])
    assert "<- chosen" in explain(estimates, best)


def test_flat_target_cost_favours_big_trees():
    rounds = [WarmupRound(tuple(range(40)), tuple(range(64)), tuple([1] * 8 + [r // 8 + 1 for r in range(56)]))]
    flat = {1: 5.0, 1024: 5.0}  # offloaded: a pass costs the same whatever its size
    assert choose(estimate(rounds, flat, {1: 0.01, 64: 0.02}, (1, 4, 16, 64))).budget == 64


def test_ties_go_to_the_smaller_budget():
    a, b = BudgetEstimate(8, 2.0, 0.5, 0.5), BudgetEstimate(16, 2.0, 0.5, 0.5)
    assert choose([b, a]).budget == 8


def _options(budget_auto=True, temperature=0.0):
    from specexec.drafter.tree_config import TreeConfig
    from specexec.protocol.sampling import SamplingParams
    return RunOptions(TreeConfig("specexec", 64), SamplingParams(temperature, 1.0, 0), 16,
                      budget_auto=budget_auto)


def test_budget_tuners_are_kept_per_context_and_settings():
    tuners = BudgetTuners(lambda: {1: 0.1}, lambda: {1: 0.01})
    chat = tuners.for_run(_options(), "chat")
    assert tuners.for_run(_options(), "chat") is chat  # a chat warms up once
    assert tuners.for_run(_options(), "humaneval") is not chat
    assert tuners.for_run(_options(temperature=0.6), "chat") is not chat
    assert tuners.for_run(_options(), None) is not tuners.for_run(_options(), None)  # no context: fresh
    assert tuners.for_run(_options(budget_auto=False), "chat") is None


# -- AutoBudget over observed rounds ------------------------------------------------------------

from types import SimpleNamespace

from specexec.drafter.budget_tuner import AutoBudget
from specexec.drafter.session import RoundStats
from specexec.protocol.tree import DraftTree


def chain_round(size: int, accepted: int):
    """A sent chain of `size` nodes (ranks in depth order) of which the first `accepted` were accepted."""
    tree = DraftTree.build(list(range(size)), [-1] + list(range(size - 1)))
    return SimpleNamespace(tree=tree, nodes=list(range(1, size + 1)), ranks=list(range(size))), list(range(accepted))


def bushy_round(size: int, _accepted=None):
    """A sent tree whose accepted path holds the nodes ranked 0, 1, 3, 7, ... (one more per doubling
    of the budget, as when the target's choices sit ever further down the draft's ranking); the
    other nodes hang under the root."""
    path = [2 ** k - 1 for k in range(size.bit_length()) if 2 ** k - 1 < size]
    parents = [-1] * size
    for above, node in zip(path, path[1:]):
        parents[node] = above
    tree = DraftTree.build(list(range(size)), parents)
    return SimpleNamespace(tree=tree, nodes=list(range(1, size + 1)), ranks=list(range(size))), path


def feed(tuner, rounds, accept_rate=0.5, verify=lambda n: 1.0, draft=lambda n: 0.01, most=10**9,
         shape=chain_round):
    for _ in range(rounds):
        b = tuner.budget
        if b == 0:
            tuner.observe(None, [], RoundStats(0, 0, 1, 0, 0.0, verify(0), 0.0))
            continue
        sent, acc = shape(b, min(int(b * accept_rate), most))
        tuner.observe(sent, acc, RoundStats(b, b, len(acc) + 1, 0, draft(b), verify(b), 0.0))


def test_flat_target_climbs_past_every_budget_seen():
    tuner = AutoBudget({1: 1.0, 4096: 1.0}, {1: 0.001, 64: 0.002}, warmup_budget=8, every=2)
    feed(tuner, 12, shape=bushy_round)
    assert tuner.budget >= 128  # 8 -> 32 -> 128 -> ...: extrapolated acceptance, flat cost


def test_extrapolation_rests_on_rounds_not_on_one_big_tree():
    """One big tree that happened to accept a long path (and the last rounds' small trees) must
    not make a budget the other rounds never reached look like a gain (the acceptance at a size
    is only compared with the acceptance of the same rounds at half that size)."""
    tuner = AutoBudget({1: 1.0, 4096: 1.0}, {1: 0.001, 64: 0.002}, warmup_budget=16, every=100)
    big, _ = chain_round(250, 0)
    tuner.observe(big, list(range(12)), RoundStats(250, 250, 13, 0, 0.01, 1.0, 0.0))
    for _ in range(5):
        sent, acc = chain_round(128, 4)
        tuner.observe(sent, acc, RoundStats(128, 128, 5, 0, 0.01, 1.0, 0.0))
    by_budget = {e.budget: e.tokens_per_round for e in tuner.estimates()}
    assert by_budget[256] == pytest.approx(by_budget[128])  # chains: doubling showed no gain
    assert by_budget[128] < 7


def test_measured_verify_time_corrects_the_curve():
    curve = {1: 0.1, 4096: 0.1}  # the profile says flat and cheap
    tuner = AutoBudget(curve, {1: 0.001, 64: 0.002}, warmup_budget=8, every=2)
    real = lambda n: 0.1 + 0.02 * n  # the real passes grow with the tree
    feed(tuner, 16, verify=real, most=6)  # at most 6 tokens accepted: big trees don't pay
    sizes = {r.size for r in tuner.rounds}
    assert len(sizes) > 1
    by_budget = {e.budget: e for e in tuner.estimates()}
    for n in sizes & set(by_budget):
        assert by_budget[n].target_s == pytest.approx(real(n))
    assert tuner.budget < 256  # a flat profile alone would have climbed on


def test_guard_decodes_alone_when_speculation_loses_and_tries_again():
    # trees accept nothing and cost more than a plain pass: each tree round is slower than the target alone
    tuner = AutoBudget({1: 0.5, 64: 0.5}, {1: 0.001, 64: 0.002}, warmup_budget=16, every=2, backoff=3)
    seen = []
    for _ in range(20):
        feed(tuner, 1, accept_rate=0.0, verify=lambda n: 0.5 + 0.01 * n, draft=lambda n: 0.2)
        seen.append(tuner.budget)
    assert 0 in seen and seen[-1] == 0 or seen.count(0) > 10
    first_plain = seen.index(0)
    assert any(b > 0 for b in seen[first_plain:])  # it tried trees again after the backoff
    assert seen.count(0) > len(seen) // 2  # and backed off longer each time it lost


def test_guard_keeps_trees_that_win():
    tuner = AutoBudget({1: 0.5, 64: 0.5}, {1: 0.001, 64: 0.002}, warmup_budget=16, every=2)
    seen = []
    for _ in range(12):
        feed(tuner, 1, accept_rate=0.5, verify=lambda n: 0.5)
        seen.append(tuner.budget)
    assert 0 not in seen
