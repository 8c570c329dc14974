import itertools
from collections import Counter

import pytest
import torch

from harness import run
from specexec.protocol.sampling import SamplingParams, target_distribution
from stats_check import matches
from tiny_models import ARCHS, greedy_reference, perturbed, tiny_lm
from specexec.verifier.target_model import TargetModel
from specexec.drafter.draft_model import DraftModel
from specexec.drafter.budget_tuner import AutoBudget

PROMPTS = [[3, 14, 15, 9, 2, 6], [50, 51, 52], [7], [88, 1, 88, 1, 88, 1, 88, 1]]
N_NEW = 24


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    target = tiny_lm(request.param, seed=0)
    return TargetModel(target), DraftModel(perturbed(target, 0.05)), target


@pytest.mark.parametrize("method", ["specexec", "specinfer", "chain"])
@pytest.mark.parametrize("budget", [1, 3, 16, 64, 256])
def test_greedy_output_equals_target_greedy(pair, method, budget):
    target, draft, model = pair
    for prompt in PROMPTS:
        ref = greedy_reference(model, prompt, N_NEW)
        out = run(target, draft, prompt, N_NEW, method=method, budget=budget)
        assert out.token_ids == ref, (method, budget, prompt)
        assert out.stats.new_tokens == N_NEW
        assert out.stats.target_forwards == len(out.stats.rounds)


@pytest.mark.parametrize("budget", [1, 3, 16, 64, 256])
def test_greedy_output_is_exact_with_ngram_nodes(pair, budget):
    """Prompt-lookup nodes on (PROMPTS[3] repeats itself, so they are proposed and accepted)."""
    target, draft, model = pair
    for prompt in PROMPTS:
        out = run(target, draft, prompt, N_NEW, budget=budget, ngram=True)
        assert out.token_ids == greedy_reference(model, prompt, N_NEW), (budget, prompt)


def test_trees_are_accepted_deeply(pair):
    """The fixture's draft is good enough that the test above exercises multi-token rounds."""
    target, draft, _ = pair
    out = run(target, draft, PROMPTS[0], N_NEW, budget=64)
    assert out.stats.gen_rate > 2
    assert max(r.accepted for r in out.stats.rounds) >= 4


def test_auto_budget_learns_from_every_round_of_every_generation(pair):
    """One tuner across two generations: it records every tree round of both and re-decides;
    the output stays the target's own (the choices themselves: tests/test_budget_tuner.py)."""
    target, draft, model = pair
    tuner = AutoBudget({1: 0.1, 4096: 0.1}, {1: 1e-4, 64: 2e-4}, warmup_budget=8, warmup_rounds=2, every=2)
    first = run(target, draft, PROMPTS[0], N_NEW, auto_budget=tuner)
    assert first.token_ids == greedy_reference(model, PROMPTS[0], N_NEW)
    assert first.stats.rounds[0].tree_size == 8 and tuner.chosen is not None
    seen = len(tuner.rounds)
    assert seen == sum(r.mode == "tree" for r in first.stats.rounds)
    second = run(target, draft, PROMPTS[1], N_NEW, auto_budget=tuner)
    assert second.token_ids == greedy_reference(model, PROMPTS[1], N_NEW)
    assert len(tuner.rounds) == seen + sum(r.mode == "tree" for r in second.stats.rounds)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_speed_guard_switches_modes_and_output_stays_exact(pair, prompt):
    """A target alone pretended nearly free: speculation loses, the guard decodes autoregressively
    for a while, tries trees again, and so on; the output is the target's greedy output."""
    target, draft, model = pair
    tuner = AutoBudget({1: 1e-7, 64: 1e-7}, {1: 1e-4, 64: 2e-4}, warmup_budget=16, warmup_rounds=1,
                       every=1, backoff=1)
    out = run(target, draft, prompt, N_NEW, auto_budget=tuner)
    assert out.token_ids == greedy_reference(model, prompt, N_NEW)
    modes = out.stats.summary()["tokens_by_mode"]
    assert modes.get("tree", 0) > 0 and modes.get("autoregressive", 0) > 1
    assert sum(modes.values()) == N_NEW
    assert all(r.tree_size == 0 and r.draft_forwards == 0 for r in out.stats.rounds if r.mode == "autoregressive")


def test_autoregressive_is_the_empty_tree(pair):
    target, _, model = pair
    out = run(target, None, PROMPTS[0], N_NEW, method="autoregressive")
    assert out.token_ids == greedy_reference(model, PROMPTS[0], N_NEW)
    assert out.stats.gen_rate == 1.0 and all(r.tree_size == 0 for r in out.stats.rounds)


def test_stop_token_ends_generation(pair):
    target, draft, model = pair
    ref = greedy_reference(model, PROMPTS[0], N_NEW)
    stop = ref[9]
    out = run(target, draft, PROMPTS[0], N_NEW, stop_ids=frozenset({stop}))
    assert out.token_ids == ref[: ref.index(stop) + 1] and out.finished


@pytest.mark.parametrize("budget", [1, 16, 64])
def test_full_context_ends_generation_cleanly(pair, budget):
    """Near the end of the target's context the trees shrink to fit; generation then stops with
    what it has (no error), equal to the target's own greedy output up to there."""
    target, draft, model = pair
    prompt = PROMPTS[0]
    limit = len(prompt) + 10
    out = run(target, draft, prompt, N_NEW, budget=budget, max_context=limit)
    assert out.error is None and out.context_full and not out.finished
    assert len(prompt) + len(out.token_ids) >= limit
    assert all(len(prompt) + sum(r.accepted for r in out.stats.rounds[:i]) + r.tree_size <= limit
               for i, r in enumerate(out.stats.rounds))
    assert out.token_ids == greedy_reference(model, prompt, N_NEW)[: len(out.token_ids)]


@pytest.mark.parametrize("budget", [4, 32])
def test_seeded_sampling_is_reproducible_and_tree_independent(pair, budget):
    """Keyed randomness: the same seed gives the same tokens for any tree, and for plain decoding."""
    target, draft, _ = pair
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=123)
    plain = run(target, None, PROMPTS[0], N_NEW, method="autoregressive", params=params).token_ids
    spec = run(target, draft, PROMPTS[0], N_NEW, budget=budget, params=params).token_ids
    assert spec == plain
    other = run(target, None, PROMPTS[0], N_NEW, method="autoregressive",
                params=SamplingParams(temperature=0.8, top_p=0.95, seed=124)).token_ids
    assert other != plain


def exact_first_tokens(model, prompt, params, k=3):
    """P(x1..xk) by plain forwards over every prefix: the target's distribution, known exactly."""
    vocab = model.config.vocab_size
    probs = {(): 1.0}
    for _ in range(k):
        nxt = {}
        with torch.inference_mode():
            for prefix, pr in probs.items():
                logits = model(torch.tensor([prompt + list(prefix)])).logits[0, -1]
                dist = target_distribution(logits, params)
                for t in range(vocab):
                    if dist[t] > 0:
                        nxt[prefix + (t,)] = pr * float(dist[t])
        probs = nxt
    return probs


@pytest.mark.parametrize("method", ["specexec", "specinfer"])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.6, 0.9)])
def test_sampling_is_lossless(method, temperature, top_p):
    """Empirical law of the first 3 tokens over 2000 seeded runs equals the target's exact law."""
    model = tiny_lm("llama", vocab=6, hidden=32, init_range=0.6, seed=3)
    draft = DraftModel(perturbed(model, 0.8, seed=5))
    target = TargetModel(model)
    prompt = [1, 4, 2]
    exact = exact_first_tokens(model, prompt, SamplingParams(temperature, top_p))
    counts, n = Counter(), 2000
    for seed in range(n):
        params = SamplingParams(temperature, top_p, seed)
        out = run(target, draft, prompt, 3, method=method, budget=6, params=params,
                  max_n_beams=4, branch_width=3)
        counts[tuple(out.token_ids)] += 1
    ok, stat, crit = matches(counts, exact, n)
    assert ok, f"chi2 {stat:.1f} >= {crit:.1f}"
    # Power: a sampler that leaked the draft's law into the output would be caught at this n.
    leaked = exact_first_tokens(draft.model, prompt, SamplingParams(temperature, top_p))
    expected_if_leaked = {cell: round(p * n) for cell, p in leaked.items()}
    assert not matches(expected_if_leaked, exact, n)[0]


def test_rounds_report_what_drafting_cost(pair):
    """Per round: draft forwards, nodes expanded and sent; the summary totals them; round time
    splits into drafting, verification and waiting."""
    target, draft, _ = pair
    before = draft.forwards
    out = run(target, draft, PROMPTS[0], N_NEW, budget=16)
    rounds, summary = out.stats.rounds, out.stats.summary()
    assert summary["draft_forwards"] == sum(r.draft_forwards for r in rounds) == draft.forwards - before - 1
    assert all(r.draft_forwards >= 1 and r.expanded >= 1 for r in rounds[:-1])
    assert summary["nodes_sent"] == sum(r.tree_size for r in rounds)
    assert summary["expansions_per_node_sent"] == round(sum(r.expanded for r in rounds) / summary["nodes_sent"], 3)
    assert summary["carried_nodes_mean"] == round(sum(r.carried for r in rounds) / len(rounds), 2)
    assert all(r.verify_s > 0 and r.wait_s >= 0 and r.round_s >= r.verify_s for r in rounds)
    assert summary["tokens_by_mode"]["tree"] >= N_NEW - 1  # the last token needs no tree
