"""`--budget auto`: pick the tree budget that maximises expected tokens per second here.

Inputs, all measured: the target's forward time against the number of tokens (from the
verifier's profile), the draft's forward time against batch size, and a few warm-up rounds
grown with a large budget. Best-first trees are nested -- the budget-B tree is the B
best-scoring nodes of any larger tree from the same root -- so one warm-up round tells what
every smaller budget would have accepted: the accepted path cut at the first node ranked B
or worse. Per budget B the model is

    tokens per round  g(B) = 1 + mean accepted nodes of rank < B
    draft seconds     D(B) = (mean depth of the top-B tree + 1) * draft_time(B / depth)
    target seconds    T(B) = target_time(B + 1)
    tokens/s          g(B) / (D(B) + T(B))

(rounds run draft then target; with overlap the drafter's head start only helps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

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


@dataclass
class AutoBudget:
    """`--budget auto`: warm up with a large budget, then keep the budget the tuner picks."""

    target_curve: dict[int, float]
    draft_curve: dict[int, float]
    warmup_budget: int = 64
    warmup_rounds: int = 3
    report: Callable[[str], None] | None = None
    rounds: list = field(default_factory=list)
    chosen: BudgetEstimate | None = None

    @property
    def budget(self) -> int:
        """The budget to draft with now: the chosen one, or the warm-up's until the choice."""
        return self.chosen.budget if self.chosen else self.warmup_budget

    def observe(self, sent, accepted: list[int]) -> int | None:
        """Record a warm-up round; returns the chosen budget once the warm-up is over."""
        if self.chosen is not None or sent is None:
            return None
        self.rounds.append(WarmupRound(tuple(sent.ranks[i] for i in accepted), tuple(sent.ranks),
                                                    tuple(int(d) for d in sent.tree.depths())))
        if len(self.rounds) < self.warmup_rounds:
            return None
        candidates = [b for b in CANDIDATES if b <= self.warmup_budget]
        estimates = estimate(self.rounds, self.target_curve, self.draft_curve, candidates)
        self.chosen = choose(estimates)
        if self.report:
            self.report(explain(estimates, self.chosen))
        return self.chosen.budget


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
