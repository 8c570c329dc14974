"""One generation session on the verifier: its KV cache, sampling rule and limits."""

from __future__ import annotations

import time
from dataclasses import dataclass

from specexec.protocol.messages import Verdict, VerifyRequest
from specexec.protocol.kv_prune import cache_length
from specexec.protocol.sampling import SamplingParams
from specexec.protocol.tree import TreeError
from specexec.verifier.acceptance import RULES, walk
from specexec.verifier.placement import peak_rss_mb
from specexec.verifier.target_model import TargetModel


@dataclass(frozen=True)
class SessionConfig:
    params: SamplingParams
    rule: str = "specexec"  # which acceptance rule the drafter's trees are built for
    stop_ids: frozenset[int] = frozenset()

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown acceptance rule {self.rule!r}; expected one of {RULES}")


class TargetSession:
    """Verifies one drafter's trees against the target, keeping the committed sequence cached."""

    def __init__(self, target: TargetModel, config: SessionConfig):
        self.target = target
        self.config = config
        self.cache = target.new_cache()
        self.rounds = 0

    @property
    def processed(self) -> int:
        """Committed tokens whose keys and values are in the cache."""
        return cache_length(self.cache)

    def check(self, request: VerifyRequest) -> None:
        """Raise TreeError/ValueError naming what is wrong with a request, before any compute."""
        vocab = self.target.vocab_size
        if not request.append:
            raise ValueError("append is empty: the root (last committed token) must be sent")
        bad = [t for t in request.append if not 0 <= t < vocab]
        if bad:
            raise TreeError(f"append holds token id {bad[0]} out of range [0, {vocab})")
        if request.max_emit < 1:
            raise ValueError(f"max_emit must be at least 1, got {request.max_emit}")
        request.tree.validate(vocab)
        if self.config.rule == "specinfer" and not self.config.params.greedy and len(request.tree) \
                and not request.tree.has_draft_probs:
            raise TreeError("the specinfer rule needs the draft distributions (q) with the tree")

    def verify(self, request: VerifyRequest) -> Verdict:
        self.check(request)
        start = time.perf_counter()
        position = self.processed + len(request.append)
        outputs = self.target.forward(self.cache, request.append, request.tree)
        result = walk(request.tree, outputs.logits, self.config.params, self.config.rule,
                      position, request.max_emit, self.config.stop_ids)
        self.target.commit(self.cache, len(request.tree), result.accepted)
        self.rounds += 1
        extra = {"peak_rss_mb": round(peak_rss_mb(), 1)}
        if self.target.last_stream is not None:
            read = self.target.last_stream
            extra.update(read_bytes=read.bytes_read, read_s=round(read.read_s, 4), read_wait_s=round(read.wait_s, 4))
        return Verdict(request.round, result.accepted, result.bonus, result.finished,
                       verify_s=time.perf_counter() - start, extra=extra)
