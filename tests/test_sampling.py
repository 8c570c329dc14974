import math

import pytest
import torch

from specexec.protocol.sampling import SamplingParams, emit, sample, target_distribution, uniform


def brute_nucleus(logits, temperature, top_p):
    probs = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(probs, descending=True)
    keep, mass = [], 0.0
    for i in order.tolist():
        keep.append(i)
        mass += float(probs[i])
        if mass >= top_p:
            break
    out = torch.zeros_like(probs)
    out[keep] = probs[keep] / probs[keep].sum()
    return out


def test_greedy_is_one_hot_argmax():
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9])
    p = target_distribution(logits, SamplingParams(temperature=0))
    assert p.tolist() == [0, 1, 0, 0]
    assert emit(logits, SamplingParams(), position=7) == 1


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.6, 0.9), (1.3, 0.5), (0.7, 0.999)])
def test_distribution_matches_brute_force(temperature, top_p):
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        logits = torch.randn(1000, generator=gen) * 3
        got = target_distribution(logits, SamplingParams(temperature, top_p))
        assert torch.allclose(got, brute_nucleus(logits, temperature, top_p), atol=1e-12)
        assert math.isclose(float(got.sum()), 1.0, rel_tol=1e-12)


def test_nucleus_past_the_shortlist():
    logits = torch.zeros(5000)  # flat: the nucleus needs 2501 tokens, beyond the top-k shortlist
    got = target_distribution(logits, SamplingParams(1.0, 0.5001))
    assert int((got > 0).sum()) == 2501
    assert torch.allclose(got, brute_nucleus(logits, 1.0, 0.5001), atol=1e-12)


def test_inverse_cdf_sample_boundaries():
    p = torch.tensor([0.0, 0.25, 0.0, 0.75], dtype=torch.float64)
    assert sample(p, 0.0) == 1
    assert sample(p, 0.2499) == 1
    assert sample(p, 0.25) == 3
    assert sample(p, 0.999999) == 3
    assert sample(torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64), 1 - 1e-17) == 1


def test_uniform_is_keyed_and_spread():
    assert uniform(1, 2) == uniform(1, 2)
    assert uniform(1, 2) != uniform(1, 3) != uniform(2, 2)
    assert uniform(1, 2, 0) != uniform(1, 2, 1)
    draws = [uniform(5, pos) for pos in range(20000)]
    assert 0 <= min(draws) and max(draws) < 1
    assert abs(sum(draws) / len(draws) - 0.5) < 0.01


def test_keyed_sampling_follows_the_distribution():
    logits = torch.tensor([1.0, 0.0, 2.0, -1.0])
    params = SamplingParams(temperature=1.0, seed=11)
    counts = torch.zeros(4)
    for pos in range(20000):
        counts[emit(logits, params, pos)] += 1
    expected = torch.softmax(logits, 0) * 20000
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(seed=-1), "seed"),
])
def test_bad_params_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def brute_top_k_min_p(logits, temperature, top_k, min_p):
    probs = torch.softmax(logits.double() / temperature, -1)
    if top_k:
        kth = torch.sort(probs, descending=True).values[top_k - 1]
        probs = torch.where(probs >= kth, probs, 0)
        probs = probs / probs.sum()
    if min_p:
        probs = torch.where(probs >= min_p * probs.max(), probs, 0)
        probs = probs / probs.sum()
    return probs


@pytest.mark.parametrize("top_k, min_p", [(1, 0.0), (5, 0.0), (0, 0.1), (20, 0.05), (0, 1.0)])
def test_top_k_and_min_p_match_brute_force(top_k, min_p):
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        logits = torch.randn(500, generator=gen) * 3
        got = target_distribution(logits, SamplingParams(0.8, top_k=top_k, min_p=min_p))
        assert torch.allclose(got, brute_top_k_min_p(logits, 0.8, top_k, min_p), atol=1e-12)
        if top_k:
            assert int((got > 0).sum()) <= top_k


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=-1), "top_k"), (dict(top_k=1.5), "top_k"), (dict(min_p=-0.1), "min_p"), (dict(min_p=2), "min_p"),
])
def test_bad_top_k_min_p_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [1e-40, 1e-310, 1e-6])
def test_a_tiny_temperature_is_greedy_not_nan(temperature):
    from specexec.protocol.sampling import GREEDY_BELOW
    params = SamplingParams(temperature=temperature)
    assert temperature < GREEDY_BELOW and params.greedy and params.temperature == 0.0
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9])
    assert target_distribution(logits, params).tolist() == [0, 1, 0, 0]
    assert SamplingParams(temperature=GREEDY_BELOW).temperature == GREEDY_BELOW  # the threshold itself samples


def test_a_tiny_temperature_grows_a_finite_draft_tree():
    from specexec.drafter.tree_search import TreeConfig, TreeSearch
    from known_draft import KnownDraft
    search = TreeSearch(KnownDraft(24), TreeConfig("specexec", 8), SamplingParams(temperature=1e-40))
    search.start([3, 1, 4])
    search.grow()
    assert all(math.isfinite(s) for s in search.score)
    assert len(search.tree().tree) == 8


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_probabilities_are_refused_where_they_are_made(bad):
    logits = torch.tensor([0.1, bad, 0.3])
    with pytest.raises(ValueError, match="not finite"):
        target_distribution(logits, SamplingParams(temperature=0.7))


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor
    from specexec.protocol.sampling import penalize, seen_mask
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(50, generator=gen) * 3
    context = [4, 4, 9, 17, 30, 49, 0]
    for penalty in (1.3, 0.7):
        want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([context]), logits[None].clone())[0]
        got = penalize(logits, seen_mask(context, 50), penalty)
        assert torch.allclose(got, want) and not torch.allclose(got, logits)
    assert penalize(logits, None, 1.0) is logits


@pytest.mark.parametrize("bad", [0, -1.2, float("inf"), float("nan"), "1.3"])
def test_bad_repetition_penalty_is_named(bad):
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=bad)
