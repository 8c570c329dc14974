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
ours with `max_new_tokens >= needed_tokens(N, max_depth)` and count with `count` here, or:
    python -m specexec.launch.reference_count results/run.jsonl --n 64
"""

from __future__ import annotations

import argparse
import json
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


def count_records(lines: Iterable[str], n: int, eos_ids: Iterable[int]) -> list[tuple[str, Count]]:
    """(prompt id, count) for each specexec record of a `specexec bench --out` JSONL."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("method") != "specexec":
            continue
        accepted = [r["accepted"] for r in rec["rounds"]]
        out.append((f"{rec['prompt_set']}/{rec['prompt_id']} b={rec['budget']} t={rec['temperature']}",
                    count(accepted, rec["token_ids"], n, eos_ids)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="gen_rate of a bench JSONL counted the SpecExec reference's way")
    parser.add_argument("jsonl")
    parser.add_argument("--n", type=int, default=64, help="the reference's max_new_tokens")
    parser.add_argument("--eos", type=int, nargs="+", default=[151645], help="stop ids (the reference: tokenizer.eos_token_id)")
    args = parser.parse_args(argv)
    with open(args.jsonl) as fh:
        rows = count_records(fh, args.n, args.eos)
    for name, c in rows:
        rate = "-" if c.gen_rate is None else f"{c.gen_rate:.2f}"
        print(f"{name}: {c.tokens} tokens / {c.rounds} rounds = {rate}"
              + ("" if c.complete else "  (run too short to count: rerun with --max-new-tokens "
                 "needed_tokens(n, max_depth))"))
    mean = mean_gen_rate(c for _, c in rows)
    print("mean over prompts:", "-" if mean is None else f"{mean:.2f}")


if __name__ == "__main__":
    main()
