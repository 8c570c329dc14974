"""gen_rate counted exactly as the SpecExec reference's benchmark loop counts it.

The reference (yandex-research/specexec, specdec/spec_base.py `generate_and_yield`, and
run_exp.py `run_tests`) runs one "warmup" round first and drops it, then runs rounds while
fewer than `max_new_tokens` tokens came *after* the warmup: the warmup's tokens are on top of
`max_new_tokens`, every counted round grows a full tree, and the last round is counted whole
(it may overshoot). A round holding the EOS ends the run; the EOS and what follows it are not
counted. Per prompt gen_rate = counted tokens / counted rounds; the figure is the plain mean
over prompts (`(df.new_tokens / df.iters).mean()`).

Our runs stop at `max_new_tokens` in all (the first round included) and shrink the last
rounds' trees to the tokens still wanted, so counting one of our 64-token runs the reference's
way averages in a few crippled last rounds. To compare with a reference figure for N tokens, run
ours with `max_new_tokens >= needed_tokens(N, max_depth)` and count with `count` here.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable


def needed_tokens(n: int, max_depth: int) -> int:
    """Tokens a run must be allowed so the reference's count over `n` tokens sees only full rounds:
    the first round gives at most max_depth + 1 tokens, so the last counted round starts before
    n + max_depth + 1 tokens, and a round is grown to full depth while at least max_depth + 1
    tokens are still wanted (drafter/session.py's last-round caps)."""
    return n + 2 * (max_depth + 1)


@dataclass(frozen=True)
class Count:
    tokens: int  # tokens counted after the first round
    rounds: int  # rounds counted after the first round
    complete: bool  # the count reached n tokens or an EOS (False: the run was too short to count)

    @property
    def gen_rate(self) -> float | None:
        return self.tokens / self.rounds if self.rounds else None


def count(accepted: list[int], token_ids: list[int], n: int, eos_ids: Iterable[int]) -> Count:
    """One prompt's count: `accepted` = tokens each round emitted (bonus included), `token_ids` =
    the run's new tokens in order."""
    eos = set(eos_ids)
    pos, tokens, rounds = (accepted[0] if accepted else 0), 0, 0
    for a in accepted[1:]:
        if tokens >= n:
            break
        chunk = token_ids[pos:pos + a]
        pos += a
        rounds += 1
        stop = next((i for i, t in enumerate(chunk) if t in eos), None)
        if stop is not None:
            return Count(tokens + stop, rounds, True)
        tokens += a
    return Count(tokens, rounds, tokens >= n)


def mean_gen_rate(counts: Iterable[Count]) -> float | None:
    """The reference's figure: the plain mean of per-prompt rates (prompts with no counted round left out)."""
    rates = [c.gen_rate for c in counts if c.gen_rate is not None]
    return statistics.fmean(rates) if rates else None
