"""The generation loop on the drafter side: it owns the committed sequence and the output.

Each round grows a tree, submits it, (with overlap) keeps growing while the target verifies,
commits the verdict's tokens and reroots the search on the bonus token, keeping the subtree
under it. A round may send an empty tree instead (the target decodes alone): `--budget auto`'s
speed guard, or the last token; the draft then catches up when the next tree is grown. The loop only talks to
a `VerifierLink`, so the same code drives an in-process verifier or a remote one.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from specexec.drafter.budget_tuner import AutoBudget
from specexec.drafter.search_api import DraftSearch
from specexec.drafter.tree_config import (AFTER_VERDICT_SHARE, DEFAULT_MAX_NEW_TOKENS, LAST_ROUND_NODES_PER_TOKEN,
                                          OFFLOADED_BUDGET, TreeConfig)
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
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    overlap: bool = False
    budget_auto: bool = False
    first_token_alone: bool = False  # round 0 sends no tree: the prompt's first token streams after one prefill
    budget_default: bool = False  # the budget was not chosen: OFFLOADED_BUDGET where the target streams its weights

    def placed(self, offloaded: bool) -> "RunOptions":
        """These options for a verifier whose target streams its weights (`offloaded`) or not."""
        if not (self.budget_default and offloaded) or self.tree.method == "autoregressive":
            return self
        return replace(self, tree=replace(self.tree, budget=OFFLOADED_BUDGET), budget_default=False)


@dataclass
class RoundStats:
    """One round. Its wall time is draft_s + verify_s + wait_s; overlap_s ran under verify_s."""

    tree_size: int  # nodes sent
    tree_depth: int
    accepted: int  # tokens emitted this round, the bonus included
    carried: int  # search nodes carried over from the previous round (its tree kept under the new root)
    draft_s: float  # drafting the verifier waited for: growing before the submit, rerooting after
    verify_s: float  # the verifier's own time for the pass (as it reports it)
    wait_s: float = 0.0  # the rest of submit-to-verdict: transport, a verdict waiting on a draft forward
    overlap_s: float = 0.0  # drafting while the verifier worked (hidden unless it made the verdict wait)
    draft_forwards: int = 0
    expanded: int = 0  # nodes the draft expanded this round (overlap included)
    mode: str = "tree"  # "tree", "chain" or "autoregressive" (the guard's choice; drafter.speed_guard)

    @property
    def round_s(self) -> float:
        return self.draft_s + self.verify_s + self.wait_s


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
        seconds = sum(r.round_s for r in later)
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
            "first_round_s": round(self.rounds[0].round_s, 4) if self.rounds else 0.0,
            "mean_tree_size": round(sum(r.tree_size for r in self.rounds) / n, 2),
            "mean_tree_depth": round(sum(r.tree_depth for r in self.rounds) / n, 2),
            "overlap_hit_rate": round(sum(r.carried > 0 for r in self.rounds[1:]) / max(n - 1, 1), 4),
            "verifier_peak_rss_mb": self.verifier_peak_rss_mb, "verifier_memory": self.verifier_memory,
            "read_gb_per_pass": round(self.read_bytes / 1e9 / max(self.target_forwards, 1), 4),
            "read_gbps": round(self.read_bytes / 1e9 / self.read_s, 4) if self.read_s else 0.0,
            "finish_reason": self.finish_reason,
            **self.drafting_summary(),
            **self.link,
        }

    def drafting_summary(self) -> dict:
        """What drafting cost: totals and per-round means, and the tokens each mode produced."""
        rounds, n = self.rounds, max(len(self.rounds), 1)
        sent = sum(r.tree_size for r in rounds)
        expanded = sum(r.expanded for r in rounds)
        modes: dict[str, int] = {}
        for r in rounds:
            modes[r.mode] = modes.get(r.mode, 0) + r.accepted
        return {
            "draft_forwards": sum(r.draft_forwards for r in rounds),
            "draft_forwards_per_round": round(sum(r.draft_forwards for r in rounds) / n, 2),
            "nodes_expanded": expanded, "nodes_sent": sent,
            "expansions_per_node_sent": round(expanded / sent, 3) if sent else 0.0,
            "carried_nodes_mean": round(sum(r.carried for r in rounds) / n, 2),
            "draft_s_per_round": round(sum(r.draft_s for r in rounds) / n, 4),
            "verify_s_per_round": round(sum(r.verify_s for r in rounds) / n, 4),
            "wait_s_per_round": round(sum(r.wait_s for r in rounds) / n, 4),
            "overlap_s_per_round": round(sum(r.overlap_s for r in rounds) / n, 4),
            "wait_s": round(sum(r.wait_s for r in rounds), 4),
            "tokens_by_mode": modes,
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
                 stop_ids: frozenset[int] = frozenset(), first_token_alone: bool = False):
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
        self._verdict_at = 0.0  # when the last verdict arrived (perf_counter)
        self.first_token_alone = first_token_alone

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
        work_before = self._draft_work()
        budget = self._plan(state)
        carried = self.search.reused if budget else 0
        sent = None
        if budget:
            self.search.set_budget(budget)
            self.search.limit_depth(self.max_new_tokens - len(state.new) - 1)
            self.search.grow(self._deadline(stats))
            sent = self.search.tree()
        tree = sent.tree if sent else DraftTree.empty()
        draft_s = time.perf_counter() - t
        request = VerifyRequest(self.session_id, len(stats.rounds), list(state.pending), tree,
                                self.max_new_tokens - len(state.new))
        verdict, in_flight_s, overlap_s = self._verify(request, state.committed)
        verify_s = verdict.verify_s if verdict.verify_s > 0 else in_flight_s - overlap_s
        self._verdict_at = time.perf_counter()
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
        if self.search and not state.finished and len(state.new) < self.max_new_tokens:
            if sent:
                self.search.reroot(sent, verdict.accepted, verdict.bonus)
            else:
                self.search.skip(tokens)  # the target decoded alone: the draft catches up when next needed
        draft_s += time.perf_counter() - t
        forwards, expanded = (after - before for after, before in zip(self._draft_work(), work_before))
        depth = int(tree.depths().max()) if len(tree) else 0
        mode = "tree" if sent else "autoregressive"
        stats.rounds.append(RoundStats(len(tree), depth, len(tokens), carried, draft_s, verify_s,
                                       max(in_flight_s - verify_s, 0.0), overlap_s, forwards, expanded, mode))
        stats.draft_s += draft_s
        stats.verify_s += verify_s
        if self.auto:
            self.auto.observe(sent, verdict.accepted, stats.rounds[-1], timed=len(stats.rounds) > 1)

    def _deadline(self, stats: GenerationStats) -> float | None:
        """With overlap, the tree goes out `AFTER_VERDICT_SHARE` of a pass after the verdict came
        (a round after one without a tree, with nothing grown under the verifier, grows in full)."""
        if not self.overlap or not stats.rounds or not stats.rounds[-1].tree_size:
            return None
        return self._verdict_at + AFTER_VERDICT_SHARE * stats.rounds[-1].verify_s

    def _plan(self, state: _Progress) -> int:
        """Nodes in this round's tree; 0: the target decodes alone (no draft, `--budget auto`'s
        guard, or one token left). The last rounds get trees sized to the tokens still wanted."""
        if not self.search or (self.first_token_alone and not state.new):
            return 0
        budget = self.auto.budget if self.auto else self.config.budget
        left = self.max_new_tokens - len(state.new) - 1  # tree tokens that can precede the bonus
        return max(min(budget, self._room(state), LAST_ROUND_NODES_PER_TOKEN * left), 0)

    def _draft_work(self) -> tuple[int, int]:
        """Draft forwards and node expansions so far (cumulative counters)."""
        if not self.search:
            return 0, 0
        return self.search.draft.forwards, self.search.expansions

    def _verify(self, request: VerifyRequest, committed: list[int]):
        """Submit, grow past the budget while waiting (overlap), collect; recover lost sessions.

        Returns the verdict, the seconds from submit to verdict, and the seconds of drafting in them.
        """
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
        return verdict, time.perf_counter() - t, grow_s

    def _link_counters(self) -> dict:
        link_stats = getattr(self.link, "stats", None)
        if link_stats is None:
            return {}
        return {"bytes_sent": link_stats.bytes_sent, "bytes_received": link_stats.bytes_received,
                "transport_s": link_stats.codec_s + link_stats.server_codec_s,
                "reconnects": link_stats.reconnects}
