"""One generation session on the verifier: its KV cache, sampling rule and limits.

A request is verified in steps so that memory stays linear in the tokens appended at once and
a long prefill does not hold the verifier for its whole duration: `begin` checks it, each
`advance` runs one forward over at most `prefill_chunk` appended tokens, and the last step
(the rest of the append, then the tree) walks the tree and returns the verdict. The chunks
give the same logits as one forward over everything (causal attention over the same cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from specexec.protocol.messages import Verdict, VerifyRequest
from specexec.protocol.kv_prune import cache_length
from specexec.protocol.sampling import SamplingParams, seen_mask
from specexec.protocol.tree import DraftTree, TreeError
from specexec.verifier.acceptance import RULES, walk
from specexec.verifier.disk_streamer import StreamStats
from specexec.verifier.request_memory import RequestMemory
from specexec.verifier.target_model import TargetModel

PREFILL_CHUNK = 512  # appended tokens per forward before the tree's
# A target that streams its weights reads all of them every forward, however few tokens it
# computes: at 512 a 536-token chat prompt cost two passes (10.7 s against 5.3 s under the cap).
# Its chunks are longer, up to where compute outgrows the stream (~1000 tokens on a 2-core CPU)
# and the activations stay small beside a 1 GiB budget (measured: +104 MB for 512, +333 MB for 2048).
STREAMED_PREFILL_CHUNK = 1024


def prefill_chunk(offloaded: bool) -> int:
    """Appended tokens per forward for a target that streams its weights (`offloaded`) or not."""
    return STREAMED_PREFILL_CHUNK if offloaded else PREFILL_CHUNK


@dataclass(frozen=True)
class SessionConfig:
    params: SamplingParams
    rule: str = "specexec"  # which acceptance rule the drafter's trees are built for
    stop_ids: frozenset[int] = frozenset()
    prefill_chunk: int = PREFILL_CHUNK

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown acceptance rule {self.rule!r}; expected one of {RULES}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")


@dataclass
class _Work:
    request: VerifyRequest
    memory: RequestMemory
    base: int  # cached tokens before the request
    fed: int = 0  # appended tokens already in the cache
    busy_s: float = 0.0  # time spent in this request's forwards and walk
    read: dict = field(default_factory=dict)  # a disk-streamed target's reads for this request's forwards

    def count_reads(self, stream: StreamStats | None) -> None:
        if stream is not None:
            for key, value in (("read_bytes", stream.bytes_read), ("read_s", stream.read_s),
                               ("read_wait_s", stream.wait_s)):
                self.read[key] = self.read.get(key, 0) + value


class TargetSession:
    """Verifies one drafter's trees against the target, keeping the committed sequence cached."""

    def __init__(self, target: TargetModel, config: SessionConfig):
        self.target = target
        self.config = config
        self.cache = target.new_cache()
        self.history: list[int] = []  # the committed tokens in the cache (a repetition penalty's context)
        self.rounds = 0
        self.work: _Work | None = None

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

    def begin(self, request: VerifyRequest) -> None:
        """Check a request and make it this session's work; `advance` until it returns the verdict."""
        self.check(request)
        self.work = _Work(request, RequestMemory.start(), self.processed)

    def advance(self) -> Verdict | None:
        """One forward of the work in hand: a prefill chunk (None), or the tree and the verdict.

        A failing step drops the request and its chunks from the cache, then raises."""
        work = self.work
        if work is None:
            raise RuntimeError("no request in progress")
        start = time.perf_counter()
        work.memory.step_begin()
        append, chunk = work.request.append, self.config.prefill_chunk
        try:
            if len(append) - work.fed > chunk:
                self.target.forward(self.cache, append[work.fed:work.fed + chunk], DraftTree.empty())
                self.history.extend(append[work.fed:work.fed + chunk])
                work.fed += chunk
                result = None
            else:
                result = self._walk(work.request, append[work.fed:])
            work.count_reads(self.target.last_stream)
        except BaseException:
            self.target.truncate(self.cache, work.base)
            del self.history[work.base:]
            self.work = None
            raise
        work.memory.step_end()
        work.busy_s += time.perf_counter() - start
        if result is None:
            return None
        self.work = None
        self.rounds += 1
        return Verdict(work.request.round, result.accepted, result.bonus, result.finished,
                       verify_s=work.busy_s, extra={**work.memory.report(), **work.read})

    def _walk(self, request: VerifyRequest, rest: list[int]):
        position = self.processed + len(rest)
        outputs = self.target.forward(self.cache, rest, request.tree)
        params = self.config.params
        seen = None if params.repetition_penalty == 1.0 else seen_mask(self.history + rest, self.target.vocab_size)
        result = walk(request.tree, outputs.logits, params, self.config.rule,
                      position, request.max_emit, self.config.stop_ids, seen)
        self.target.commit(self.cache, len(request.tree), result.accepted)
        self.history.extend(rest + [int(request.tree.tokens[a]) for a in result.accepted])
        return result

    def verify(self, request: VerifyRequest) -> Verdict:
        """The whole request at once (every chunk, then the tree)."""
        self.begin(request)
        while (verdict := self.advance()) is None:
            pass
        return verdict
