"""`--budget auto`: pick the tree budget that maximises tokens per second, and never lose to
the target decoding alone.

Inputs, all measured: the target's forward time against the number of tokens (the verifier's
profile), corrected online by the verify seconds each round actually took; the draft's
forward time against batch width (drafter/draft_profile.py), corrected online by the drafting
seconds each round actually waited for (overlap-hidden drafting is not counted); and the
acceptance seen in every round of the generation itself. Best-first trees are nested -- the
budget-B tree is the B best-scoring nodes of any larger tree from the same root -- so one
round tells what every smaller budget would have accepted: the accepted path cut at the first
node ranked B or worse. Per budget B the model is

    tokens per round  g(B) = 1 + mean accepted nodes of rank < B     (rounds whose tree had >= B nodes)
    draft seconds     D(B) = draft_scale * (depth(B) + 1) * draft_time(B / depth(B))
    target seconds    T(B) = target_time(B + 1), the profile scaled to the passes seen and
                             replaced by their measured times at the sizes seen
    tokens/s          g(B) / (D(B) + T(B))

Budgets larger than the trees most rounds reached (`reached`; up to `EXPLORE` times that) get
g extrapolated log-linearly from the last doubling, both ends measured on the same rounds, so a flat target curve climbs to large trees in a
few decisions. Budget 0 is the target alone: g = 1, D = 0, T = the measured 1-token pass.
The choice is re-made every `every` rounds from the last `window` rounds.

The speed guard: whatever the model says, when the measured speculative rate of the last
rounds (tokens / round seconds) falls below the target alone's measured rate, decode
autoregressively (empty trees, no drafting) for `backoff` rounds, doubling the backoff each
time speculation loses again, then try the model's choice again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable
import math

CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class WarmupRound:
    path_ranks: tuple[int, ...]  # score rank (0 = best) of each accepted node, root's child first
    node_ranks: tuple[int, ...]  # rank of every node of the sent tree
    node_depths: tuple[int, ...]  # depth of every node, same order


def interpolate(curve: dict[int, float], n: float) -> float:
    """Piecewise-linear in n through the measured points; linear extrapolation past the ends."""
    xs = sorted(curve)
    if len(xs) == 1:
        return curve[xs[0]]
    if n <= xs[0]:
        lo, hi = xs[0], xs[1]
    elif n >= xs[-1]:
        lo, hi = xs[-2], xs[-1]
    else:
        hi = next(x for x in xs if x >= n)
        lo = xs[xs.index(hi) - 1]
    slope = (curve[hi] - curve[lo]) / (hi - lo)
    return max(curve[lo] + slope * (n - lo), 1e-9)


def accepted_within(path_ranks, budget: int) -> int:
    count = 0
    for rank in path_ranks:
        if rank >= budget:
            break
        count += 1
    return count


def depth_within(node_ranks, node_depths, budget: int) -> int:
    return max((d for r, d in zip(node_ranks, node_depths) if r < budget), default=0)


@dataclass(frozen=True)
class BudgetEstimate:
    budget: int
    tokens_per_round: float
    draft_s: float
    target_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_round / (self.draft_s + self.target_s)


def estimate(rounds: list[WarmupRound], target_curve: dict[int, float], draft_curve: dict[int, float],
             budgets=CANDIDATES) -> list[BudgetEstimate]:
    out = []
    n = max(len(rounds), 1)
    for b in budgets:
        g = 1 + sum(accepted_within(r.path_ranks, b) for r in rounds) / n
        depth = sum(depth_within(r.node_ranks, r.node_depths, b) for r in rounds) / n
        draft_s = (depth + 1) * interpolate(draft_curve, b / max(depth, 1))
        out.append(BudgetEstimate(b, g, draft_s, interpolate(target_curve, b + 1)))
    return out


def choose(estimates: list[BudgetEstimate]) -> BudgetEstimate:
    """The estimate with the most tokens per second (the smaller budget on a tie)."""
    return max(estimates, key=lambda e: (e.tokens_per_s, -e.budget))


def explain(estimates: list[BudgetEstimate], chosen: BudgetEstimate) -> str:
    lines = ["budget auto: expected tokens/s per budget (measured curves, warm-up acceptance)",
             " budget | tokens/round | draft s | target s | tokens/s"]
    for e in estimates:
        mark = "  <- chosen" if e is chosen else ""
        lines.append(f" {e.budget:6d} | {e.tokens_per_round:12.2f} | {e.draft_s:7.3f} | {e.target_s:8.3f} | "
                     f"{e.tokens_per_s:8.2f}{mark}")
    return "\n".join(lines)


EXPLORE = 4  # budgets up to this many times the largest tree seen are candidates
AUTO_CANDIDATES = (0,) + CANDIDATES + (1024, 2048)


@dataclass(frozen=True)
class SeenRound:
    """One round as the tuner keeps it."""

    path_ranks: tuple[int, ...]
    node_ranks: tuple[int, ...]
    node_depths: tuple[int, ...]
    emitted: int
    draft_s: float  # drafting the round waited for
    verify_s: float
    round_s: float
    timed: bool = True  # False for a generation's first round (its prefills are no round's cost)

    @property
    def size(self) -> int:
        return len(self.node_ranks)


def acceptance(rounds: list[SeenRound], budget: int) -> float | None:
    """Mean accepted nodes at `budget` over the rounds whose tree was at least that big."""
    seen = [accepted_within(r.path_ranks, budget) for r in rounds if r.size >= budget]
    return sum(seen) / len(seen) if seen else None


def reached(rounds: list[SeenRound], share: float = 0.5) -> int:
    """The largest tree size that at least `share` of the rounds (and two, where there are two)
    reached: budgets up to it are judged from the rounds themselves, larger ones extrapolated.
    (The last rounds' trees are cut to the tokens left, and one round is no estimate.)"""
    sizes = sorted((r.size for r in rounds), reverse=True)
    k = max(min(2, len(sizes)), math.ceil(share * len(sizes)))
    return sizes[k - 1]


def mean_depth(rounds: list[SeenRound], budget: int) -> float:
    rows = [r for r in rounds if r.size >= budget] or [max(rounds, key=lambda r: r.size)]
    return sum(depth_within(r.node_ranks, r.node_depths, budget) for r in rows) / len(rows)


def median(values: list[float], default: float) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else default


@dataclass
class AutoBudget:
    """`--budget auto`: the budget for the next round, re-decided from every round seen."""

    target_curve: dict[int, float]
    draft_curve: dict[int, float]
    warmup_budget: int | None = None  # None: the largest budget a pass costs about 1-token for
    warmup_rounds: int = 2
    every: int = 4  # rounds between decisions
    window: int = 48  # rounds the estimates look back on
    backoff: int = 8  # autoregressive rounds after speculation lost (doubles on each loss)
    report: Callable[[str], None] | None = None
    rounds: list = field(default_factory=list)  # SeenRound for tree rounds
    plain_s: list = field(default_factory=list)  # round seconds of autoregressive rounds
    chosen: BudgetEstimate | None = None
    retry: int | None = None  # the best tree budget, tried again after the target ran alone
    _since: int = 0  # tree rounds since the last decision
    _streak: int = 0  # tree rounds since the target last ran alone
    _hold_plain: int = 0  # autoregressive rounds still to run
    _losses: int = 0

    def __post_init__(self):
        if self.warmup_budget is None:
            one = interpolate(self.target_curve, 1)
            flat = [b for b in CANDIDATES if interpolate(self.target_curve, b + 1) <= 1.3 * one]
            self.warmup_budget = min(max(flat, default=8), 256) if flat else 8
            self.warmup_budget = max(self.warmup_budget, 8)

    @property
    def budget(self) -> int:
        """The budget to draft with now (0: the target decodes alone this round)."""
        if self._hold_plain > 0:
            return 0
        if self.chosen is None:
            return self.warmup_budget
        return self.chosen.budget or self.retry or self.warmup_budget

    def observe(self, sent, accepted: list[int], stats, timed: bool = True) -> int | None:
        """Record a finished round (`stats`: its RoundStats; `timed` False when its time is not
        a round's, e.g. it carried the prompt's prefill); returns the budget when it changes."""
        before = self.budget
        if sent is None or not len(sent.nodes):
            if timed:
                self.plain_s.append(stats.round_s)
            self._hold_plain = max(self._hold_plain - 1, 0)
        else:
            self.rounds.append(SeenRound(tuple(sent.ranks[i] for i in accepted), tuple(sent.ranks),
                                         tuple(int(d) for d in sent.tree.depths()), stats.accepted,
                                         stats.draft_s, stats.verify_s, stats.round_s, timed))
            self._since += 1
            self._streak += 1
            if self._losing():
                self._hold_plain, self._losses = self.backoff * 2 ** self._losses, self._losses + 1
                self._streak = 0
        due = self.chosen is None and len(self.rounds) >= self.warmup_rounds or self._since >= self.every
        if due and self._hold_plain == 0 and self.rounds:
            self._decide()
        return self.budget if self.budget != before else None

    def _losing(self) -> bool:
        """The guard: the last `every` tree rounds ran slower than the target alone runs."""
        if self._streak < self.every:
            return False
        recent = [r for r in self.rounds[-self.every:] if r.timed]
        if not recent:
            return False
        spec_rate = sum(r.emitted for r in recent) / max(sum(r.round_s for r in recent), 1e-9)
        return spec_rate < 1.0 / self.plain_round_s()

    def plain_round_s(self) -> float:
        """A round of the target alone: measured when there were some, else the curve's 1-token pass."""
        if self.plain_s:
            return median(self.plain_s[-self.window:], 0.0)
        return self._target_scale() * interpolate(self.target_curve, 1)

    def _target_scale(self) -> float:
        recent = self.rounds[-self.window:]
        return median([r.verify_s / interpolate(self.target_curve, r.size + 1)
                       for r in recent if r.verify_s > 0 and r.timed], 1.0)

    def corrected_target_curve(self) -> dict[int, float]:
        """The profile scaled to the passes seen, and the passes seen themselves at their sizes."""
        scale = self._target_scale()
        curve = {n: t * scale for n, t in self.target_curve.items()}
        by_size: dict[int, list[float]] = {}
        for r in self.rounds[-self.window:]:
            if r.timed and r.verify_s > 0:
                by_size.setdefault(r.size + 1, []).append(r.verify_s)
        curve.update({n: median(ts, 0.0) for n, ts in by_size.items()})
        return curve

    def _draft_model_s(self, rounds: list[SeenRound], budget: int) -> float:
        depth = mean_depth(rounds, budget)
        return (depth + 1) * interpolate(self.draft_curve, budget / max(depth, 1))

    def estimates(self) -> list[BudgetEstimate]:
        recent = self.rounds[-self.window:]
        largest = reached(recent)
        target = self.corrected_target_curve()
        d_scale = median([r.draft_s / self._draft_model_s(recent, r.size) for r in recent if r.timed], 1.0)
        out = [BudgetEstimate(0, 1.0, 0.0, self.plain_round_s())]
        g = 1.0
        for b in AUTO_CANDIDATES[1:]:
            if b > EXPLORE * largest:
                break
            g = max(g, self._tokens_per_round(recent, b, largest))  # a bigger tree accepts no less
            out.append(BudgetEstimate(b, g, d_scale * self._draft_model_s(recent, b),
                                      interpolate(target, b + 1)))
        return out

    @staticmethod
    def _tokens_per_round(rounds: list[SeenRound], budget: int, largest: int) -> float:
        if budget <= largest:
            return 1 + acceptance(rounds, budget)
        wide = [r for r in rounds if r.size >= largest]  # both ends of the last doubling from the same rounds
        top, half = acceptance(wide, largest), acceptance(wide, max(largest // 2, 1))
        per_doubling = max(top - half, 0.0)
        return 1 + top + per_doubling * math.log2(budget / largest)

    def _decide(self) -> None:
        self._since = 0
        estimates = self.estimates()
        self.chosen = choose(estimates)
        trees = [e for e in estimates if e.budget > 0]
        self.retry = choose(trees).budget if trees else None
        if self.chosen.budget == 0:
            self._hold_plain, self._streak = self.backoff * 2 ** self._losses, 0
            self._losses += 1
        if self.report:
            self.report(explain(estimates, self.chosen))


@dataclass
class BudgetTuners:
    """`--budget auto`'s tuners, one per (context, tree config, temperature, top-p).

    A context names a stream of related prompts (a chat, a benchmark's prompt set): its
    warm-up runs once and later generations keep the budget chosen there. Without a
    context every generation warms up afresh. The curves are measured lazily (the first
    `--budget auto` run asks for them).
    """

    target_curve_fn: Callable[[], dict[int, float]]
    draft_curve_fn: Callable[[], dict[int, float]]
    report: Callable[[str], None] | None = None
    by_key: dict = field(default_factory=dict)

    def for_run(self, options, context: str | None = None) -> AutoBudget | None:
        """The tuner for one run with `options` (a RunOptions); None without --budget auto."""
        if not options.budget_auto or options.tree.method == "autoregressive":
            return None
        key = (context, options.tree, options.sampling.temperature, options.sampling.top_p)
        if context is not None and key in self.by_key:
            return self.by_key[key]
        tuner = AutoBudget(self.target_curve_fn(), self.draft_curve_fn(), report=self.report)
        if context is not None:
            self.by_key[key] = tuner
        return tuner
