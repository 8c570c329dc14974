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
