"""The generation loop on the drafter side: it owns the committed sequence and the output.

Each round grows a tree, submits it, (with overlap) keeps growing while the target verifies,
commits the verdict's tokens and reroots the search on the bonus token. The loop only talks to
a `VerifierLink`, so the same code drives an in-process verifier or a remote one.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

from specexec.drafter.budget_tuner import AutoBudget
from specexec.drafter.search_api import DraftSearch
from specexec.drafter.tree_search import TreeConfig
from specexec.protocol.link import LinkError, UnknownSession, VerifierLink
from specexec.protocol.messages import VerifyRequest
from specexec.protocol.sampling import SamplingParams
from specexec.protocol.tree import DraftTree


RESEND_ATTEMPTS = 5  # re-sends of the committed sequence in one round before giving up

# Why generation ended: a stop token, max_new_tokens, the target's context (max_context) full, or
# the verifier lost for good (GenerationResult.error says how; the tokens so far are kept).
FINISH_REASONS = ("stop", "length", "context", "interrupted")


@dataclass(frozen=True)
class RunOptions:
    """Everything one generation needs besides the models and the prompt."""

    tree: TreeConfig
    sampling: SamplingParams
    max_new_tokens: int = 256
    overlap: bool = False
    budget_auto: bool = False


@dataclass
class RoundStats:
    tree_size: int
    tree_depth: int
    accepted: int  # tokens emitted this round: the accepted path and the bonus
    reused: int  # nodes carried over from the previous round's search (overlap hits)
    draft_forwards: int  # draft model forwards this round (growth, overlap growth, reroot)
    draft_s: float
    verify_s: float


@dataclass
class GenerationStats:
    method: str
    budget: int
    new_tokens: int = 0
    target_forwards: int = 0
    wall_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    rounds: list[RoundStats] = field(default_factory=list)
    link: dict = field(default_factory=dict)  # bytes and codec time, when the verifier is remote
    verifier_peak_rss_mb: float = 0.0  # as the verifier reports it, or its cgroup's peak
    verifier_memory: str = "rss"  # where verifier_peak_rss_mb comes from: "rss" or "cgroup"
    read_bytes: int = 0  # weights the verifier read from disk (a disk-streamed target), over all passes
    read_s: float = 0.0  # seconds its reader spent reading them
    finish_reason: str = "length"  # one of FINISH_REASONS

    @property
    def gen_rate(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens/s after the first round (which carries the prompt's prefill): the SpecExec
        reference code's convention, which times and counts only the rounds after it.
        None when rounds were not recorded (a peer method timed from outside)."""
        later = self.rounds[1:]
        seconds = sum(r.draft_s + r.verify_s for r in later)
        if not seconds:
            return None
        return sum(r.accepted for r in later) / seconds

    def summary(self) -> dict:
        """The `stats` object of `generate --json` (the first nine keys are the documented ones)."""
        n = max(len(self.rounds), 1)
        return {
            "method": self.method, "budget": self.budget, "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards, "gen_rate": round(self.gen_rate, 4),
            "tokens_per_s": round(self.tokens_per_s, 4), "wall_s": round(self.wall_s, 4),
            "draft_s": round(self.draft_s, 4), "verify_s": round(self.verify_s, 4),
            "decode_tokens_per_s": None if self.decode_tokens_per_s is None else round(self.decode_tokens_per_s, 4),
            "first_round_s": round(self.rounds[0].draft_s + self.rounds[0].verify_s, 4) if self.rounds else 0.0,
            "mean_tree_size": round(sum(r.tree_size for r in self.rounds) / n, 2),
            "mean_tree_depth": round(sum(r.tree_depth for r in self.rounds) / n, 2),
            "overlap_hit_rate": round(sum(r.reused > 0 for r in self.rounds[1:]) / max(n - 1, 1), 4),
            "verifier_peak_rss_mb": self.verifier_peak_rss_mb, "verifier_memory": self.verifier_memory,
            "read_gb_per_pass": round(self.read_bytes / 1e9 / max(self.target_forwards, 1), 4),
            "read_gbps": round(self.read_bytes / 1e9 / self.read_s, 4) if self.read_s else 0.0,
            "finish_reason": self.finish_reason,
            **self.link,
        }

    def rounds_table(self) -> list[dict]:
        return [asdict(r) for r in self.rounds]


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    stats: GenerationStats
    error: str | None = None  # why generation was interrupted; token_ids holds what was kept

    @property
    def finish_reason(self) -> str:
        """One of FINISH_REASONS; the stats summary carries it too."""
        return self.stats.finish_reason


@dataclass
class _Progress:
    """The loop's state: what is committed, what is new, what the verifier has not seen."""

    committed: list[int]
    pending: list[int]
    new: list[int] = field(default_factory=list)
    finished: bool = False


class DraftSession:
    """Generates one continuation against a verifier, drafting with `search` (None: no draft)."""

    def __init__(self, link: VerifierLink, config: TreeConfig, search: DraftSearch | None,
                 max_new_tokens: int, overlap: bool = False, session_id: str | None = None,
                 auto_budget: AutoBudget | None = None, max_context: int | None = None,
                 stop_ids: frozenset[int] = frozenset()):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if search is None and config.method != "autoregressive":
            raise ValueError(f"method {config.method} needs a draft model")
        self.link, self.config, self.search = link, config, search
        self.max_new_tokens, self.overlap = max_new_tokens, overlap
        self.session_id = session_id or uuid.uuid4().hex
        self.auto = auto_budget if search is not None else None
        self.max_context = max_context  # committed + tree tokens the target accepts (None: no limit)
        self.stop_ids = stop_ids  # the verifier's; tells a stop token at the length limit from the limit

    def generate(self, prompt_ids: list[int], on_tokens: Callable[[list[int]], None] | None = None
                 ) -> GenerationResult:
        """Run rounds until max_new_tokens or a stop token. A verifier lost for good (LinkError)
        ends generation early: the result keeps every token accepted so far and says why."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        stats = GenerationStats(self.config.method, self.config.budget if self.search else 0)
        state = _Progress(list(prompt_ids), list(prompt_ids))
        link_before = self._link_counters()
        start = time.perf_counter()
        error = None
        try:
            if self.search:
                if self.auto:
                    self.search.set_budget(self.auto.budget)
                self.search.start(state.committed)
                stats.draft_s += time.perf_counter() - start
            while len(state.new) < self.max_new_tokens and not state.finished and self._room(state) > 0:
                self._round(state, stats, on_tokens)
        except LinkError as err:
            error = str(err)
        stats.new_tokens, stats.target_forwards = len(state.new), len(stats.rounds)
        stats.wall_s = time.perf_counter() - start
        if self.auto:  # the chosen budget, or the warm-up's if the text ended before the choice
            stats.budget = self.auto.budget
        stats.link = {k: round(v - link_before.get(k, 0), 6) for k, v in self._link_counters().items()}
        stats.finish_reason = self._finish_reason(state, error)
        return GenerationResult(list(prompt_ids), state.new, stats, error)

    def _finish_reason(self, state: _Progress, error: str | None) -> str:
        if error is not None:
            return "interrupted"
        if state.finished and (len(state.new) < self.max_new_tokens or state.new[-1] in self.stop_ids):
            return "stop"  # the verifier also says finished when the quota is used up
        return "length" if len(state.new) >= self.max_new_tokens else "context"

    def _room(self, state: _Progress) -> int:
        """Tree nodes the target's context still has room for (>= 0 means a round can run)."""
        if self.max_context is None:
            return 2**31
        return self.max_context - len(state.committed)

    def _round(self, state: _Progress, stats: GenerationStats, on_tokens) -> None:
        t = time.perf_counter()
        forwards = self.search.draft.forwards if self.search else 0
        sent = None
        if self.search:
            if self._room(state) < self.search.config.budget:
                self.search.set_budget(max(self._room(state), 1))  # the context is nearly full
            self.search.grow()
            sent = self.search.tree()
        tree = sent.tree if sent else DraftTree.empty()
        reused = self.search.reused if self.search else 0
        draft_s = time.perf_counter() - t
        request = VerifyRequest(self.session_id, len(stats.rounds), list(state.pending), tree,
                                self.max_new_tokens - len(state.new))
        verdict, verify_s, grow_s = self._verify(request, state.committed)
        tokens = verdict.tokens(tree)
        stats.verifier_peak_rss_mb = max(stats.verifier_peak_rss_mb, float(verdict.extra.get("peak_rss_mb", 0.0)))
        stats.read_bytes += int(verdict.extra.get("read_bytes", 0))
        stats.read_s += float(verdict.extra.get("read_s", 0.0))
        state.committed += tokens
        state.new += tokens
        state.pending = [verdict.bonus]
        state.finished = verdict.finished
        if on_tokens:
            on_tokens(tokens)
        t = time.perf_counter()
        if self.auto and (budget := self.auto.observe(sent, verdict.accepted)):
            self.search.set_budget(budget)
        if self.search and not state.finished and len(state.new) < self.max_new_tokens:
            self.search.reroot(sent, verdict.accepted, verdict.bonus)
        draft_s += grow_s + time.perf_counter() - t
        depth = int(tree.depths().max()) if len(tree) else 0
        forwards = self.search.draft.forwards - forwards if self.search else 0
        stats.rounds.append(RoundStats(len(tree), depth, len(tokens), reused, forwards, draft_s, verify_s))
        stats.draft_s += draft_s
        stats.verify_s += verify_s

    def _verify(self, request: VerifyRequest, committed: list[int]):
        """Submit, grow past the budget while waiting (overlap), collect; recover lost sessions."""
        t = time.perf_counter()
        self.link.submit(request)
        grow_s = 0.0
        while self.overlap and self.search and not self.link.ready():
            g = time.perf_counter()
            grown = self.search.grow_beyond()
            grow_s += time.perf_counter() - g
            if not grown:
                break
        for attempt in range(RESEND_ATTEMPTS + 1):
            try:
                verdict = self.link.collect()
                break
            except UnknownSession:
                # The verifier lost our state (restart, eviction): re-send the whole committed sequence.
                if attempt == RESEND_ATTEMPTS:
                    raise LinkError(f"the verifier dropped this session {attempt + 1} times in a row; giving up")
                request = VerifyRequest(request.session, request.round, list(committed), request.tree,
                                        request.max_emit)
                self.link.submit(request)
        return verdict, time.perf_counter() - t - grow_s, grow_s

    def _link_counters(self) -> dict:
        link_stats = getattr(self.link, "stats", None)
        if link_stats is None:
            return {}
        return {"bytes_sent": link_stats.bytes_sent, "bytes_received": link_stats.bytes_received,
                "transport_s": link_stats.codec_s + link_stats.server_codec_s,
                "reconnects": link_stats.reconnects}
