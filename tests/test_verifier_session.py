"""The verifier's session: chunked prefill gives the same verdicts and cache, in memory linear in
the appended tokens, and reports each request's own peak memory."""

import os

import numpy as np
import pytest
import torch

from figures import record
from specexec.protocol.messages import VerifyRequest
from specexec.protocol.sampling import SamplingParams
from specexec.protocol.tree import DraftTree
from specexec.verifier.session import SessionConfig, TargetSession
from specexec.verifier.target_model import TargetModel
from tiny_models import tiny_lm

SIZES = [int(n) for n in os.environ.get("SPECEXEC_PREFILL_SIZES", "2048,4096,8192,16384").split(",")]


def long_model(seed=3):
    model = tiny_lm("llama", seed=seed)
    model.config.max_position_embeddings = 1 << 16  # rotary positions are computed, not tabled
    return model


def request(n, round_=0, seed=0):
    rng = np.random.default_rng(seed)
    tree = DraftTree.build(rng.integers(0, 96, 6).tolist(), [-1, 0, 0, 1, -1, 4])
    return VerifyRequest("s", round_, rng.integers(0, 96, n).tolist(), tree, 4)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, seed=5)])
def test_chunked_prefill_gives_the_same_verdicts_and_cache(params):
    target = TargetModel(long_model())
    whole = TargetSession(target, SessionConfig(params, prefill_chunk=1 << 20))
    chunked = TargetSession(target, SessionConfig(params, prefill_chunk=64))
    for round_, n in enumerate([300, 1, 130]):
        req = request(n, round_, seed=round_)
        a, b = whole.verify(req), chunked.verify(req)
        assert (a.accepted, a.bonus, a.finished) == (b.accepted, b.bonus, b.finished)
        assert whole.processed == chunked.processed
    for la, lb in zip(whole.cache.layers, chunked.cache.layers):
        torch.testing.assert_close(la.keys, lb.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(la.values, lb.values, atol=1e-5, rtol=1e-4)


def test_request_memory_is_linear_in_the_appended_tokens():
    target = TargetModel(long_model())
    grew = {}
    for n in SIZES:
        session = TargetSession(target, SessionConfig(SamplingParams()))
        verdict = session.verify(request(n))
        assert verdict.extra["peak_rss_exact"]
        grew[n] = verdict.extra["request_rss_mb"]
        del session
    record("memory", request_rss_mb_by_appended_tokens=grew)
    # One forward over all n appended tokens needs an n x n attention mask and scores: at 16k tokens
    # that is 1 GiB for the float32 mask alone (+1.5 GiB was measured before chunking). Chunked, the
    # growth is the KV cache and a chunk's n x 512 scores: far below a quarter of that. (RSS growth
    # of one request in a long-lived process can read 0 when the allocator reuses freed memory, so
    # the bound is against the quadratic cost, not a ratio of two small readings.)
    large = SIZES[-1]
    quadratic_mb = large * large * 4 / 2**20
    assert grew[large] < quadratic_mb / 4, grew


def test_reported_peak_is_the_requests_own_not_the_processs_lifetime():
    import resource
    target = TargetModel(long_model())
    big = bytearray(400 << 20)  # model loading and old requests leave a high lifetime peak
    big[:: 4096] = b"x" * len(big[:: 4096])
    del big
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    verdict = TargetSession(target, SessionConfig(SamplingParams())).verify(request(64))
    assert verdict.extra["peak_rss_mb"] < lifetime - 200, (verdict.extra, lifetime)
    assert verdict.extra["request_rss_mb"] < 64
    record("memory", small_request={"reported_peak_mb": verdict.extra["peak_rss_mb"],
                                    "lifetime_peak_mb": round(lifetime, 1)})
