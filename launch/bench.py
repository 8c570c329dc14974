"""`specexec bench`: the paper's measurements over prompt sets, methods, budgets, temperatures.

Runs are interleaved per prompt (every method and budget on prompt 1, then on prompt 2, ...),
so a noisy neighbour slows all configurations alike and the speedup over `autoregressive` is
a side-by-side ratio from one run.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

from tqdm.auto import tqdm

from specexec.drafter.session import RunOptions
from specexec.drafter.tree_config import DEFAULT_BUDGET, TreeConfig
from specexec.launch import hf_assisted
from specexec.protocol.sampling import SamplingParams

BASELINE = "autoregressive"


def method_shape(label: str) -> tuple[str, tuple[int, int] | None]:
    """`specinfer:4x8` -> ("specinfer", (4, 8)): a method with a tree shape of its own (branch width x
    max depth; SpecInfer's k chains x depth d), so that each method runs at its own best shape in
    one run; a bare name takes the shared --branch-width/--max-depth."""
    name, sep, shape = label.partition(":")
    if not sep:
        return name, None
    width, x, depth = shape.partition("x")
    if not (x and width.isdigit() and depth.isdigit() and int(width) >= 1 and int(depth) >= 1):
        raise ValueError(f"method {label!r}: a shape is WIDTHxDEPTH, e.g. specinfer:4x8")
    if name in (BASELINE, "hf-assisted"):
        raise ValueError(f"method {label!r}: {name} grows no tree of ours, so it takes no shape")
    return name, (int(width), int(depth))


@dataclass(frozen=True)
class BenchSpec:
    methods: tuple[str, ...] = ("specexec", BASELINE)
    budgets: tuple = (16, 32, 64)  # ints and/or "auto", "default"
    temperatures: tuple[float, ...] = (0.0,)
    top_p: float = 0.9
    max_new_tokens: int = 64
    seed: int = 0
    warmup: bool = True
    max_depth: int | None = None  # a chain is at most this long: longer chain budgets repeat it

    def configs(self) -> list[tuple[str, int | str]]:
        """(method, budget) pairs; methods without a tree run once with budget 0; budget may be 'auto' or
        'default'."""
        out = []
        for method in self.methods:
            name = method_shape(method)[0]
            if name in (BASELINE, "hf-assisted"):
                out.append((method, 0))
            elif name == "chain" and self.max_depth:
                budgets = [b if isinstance(b, str) else min(b, self.max_depth) for b in self.budgets]
                out.extend((method, b) for b in dict.fromkeys(budgets))
            else:
                out.extend((method, b) for b in self.budgets)
        return out


@dataclass
class Record:
    method: str
    budget: int
    temperature: float
    prompt_set: str
    prompt_id: str
    stats: dict
    rounds: list = field(default_factory=list)  # per round: tree_size, tree_depth, accepted, draft_s, ...
    token_ids: list = field(default_factory=list)
    template: str = "raw"  # how the prompt was rendered: "raw" text or the target's "chat" template

    def to_json(self) -> str:
        return json.dumps({"method": self.method, "budget": self.budget, "temperature": self.temperature,
                           "prompt_set": self.prompt_set, "prompt_id": self.prompt_id, "template": self.template,
                           "stats": self.stats, "rounds": self.rounds, "token_ids": self.token_ids})


# A runner turns (prompt ids, method, budget, temperature, context) into a GenerationResult-like
# object with `.stats.summary()` and `.stats.rounds`. The context is the prompt set's name (None in
# the warm-up): `--budget auto` tunes once per set and keeps that budget for the set's prompts.
Runner = Callable[[list[int], str, int, float, "str | None"], object]


def check_prompt_sets(prompt_sets: dict[str, list]) -> None:
    """Refuse, naming the set, what would otherwise fail deep inside the run (an empty set, no set)."""
    if not prompt_sets:
        raise ValueError("no prompt sets to run: pass --prompts with a bundled set name or a prompt file")
    for name, prompts in prompt_sets.items():
        if not prompts:
            raise ValueError(f"prompt set {name!r} holds no prompts")


def run_bench(runner: Runner, prompt_sets: dict[str, list[list[int]]], prompt_ids: dict[str, list[str]],
              spec: BenchSpec, sink: Callable[[Record], None] | None = None,
              templates: dict[str, str] | None = None) -> list[Record]:
    check_prompt_sets(prompt_sets)
    configs = spec.configs()
    total = len(spec.temperatures) * sum(len(v) for v in prompt_sets.values()) * len(configs)
    if spec.warmup:
        first = next(iter(prompt_sets.values()))[0]
        for method, budget in configs:  # first forwards of each shape are slow; keep them out
            runner(first[:32], method, budget, spec.temperatures[0], None)
    records = []
    bar = tqdm(total=total, desc="bench", unit="run")
    for temperature in spec.temperatures:
        for set_name, prompts in prompt_sets.items():
            for pid, ids in zip(prompt_ids[set_name], prompts):
                for method, budget in configs:
                    bar.set_postfix_str(f"{set_name}/{pid} {method} {budget} t={temperature}")
                    result = runner(ids, method, budget, temperature, set_name)
                    rec = Record(method, budget, temperature, set_name, pid, result.stats.summary(),
                                 result.stats.rounds_table(), list(result.token_ids),
                                 (templates or {}).get(set_name, "raw"))
                    records.append(rec)
                    if sink:
                        sink(rec)
                    bar.update(1)
    bar.close()
    return records


COLUMNS = ("set", "method", "budget", "temp", "gen_rate", "gen_rate ref", "tok/s", "decode tok/s", "draft s/rnd",
           "verify s/rnd", "wait s/rnd", "fwd/rnd", "exp/node", "carried", "tree size", "tree depth", "hit rate", "GB/pass", "GB/s", "verifier MB", "speedup",
           "decode speedup")


def summarize(records: Iterable[Record]) -> list[dict]:
    """One row per (prompt set, method, budget, temperature), means over prompts."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault((f"{r.prompt_set} ({r.template})", r.method, r.budget, r.temperature), []).append(r)
    rows = []
    for (set_name, method, budget, temp), recs in groups.items():
        s = [r.stats for r in recs]
        rounds = sum(max(x["target_forwards"], 1) for x in s)
        new = sum(x["new_tokens"] for x in s)
        wall = sum(x["wall_s"] for x in s)
        rows.append({
            "set": set_name, "method": method, "budget": budget, "temp": temp,
            "gen_rate": new / rounds if rounds else 0.0,
            "gen_rate ref": reference_gen_rate(recs),
            "tok/s": new / wall if wall else 0.0,
            "decode tok/s": _mean_or_none(x["decode_tokens_per_s"] for x in s),
            "draft s/rnd": sum(x["draft_s"] for x in s) / rounds,
            "verify s/rnd": sum(x["verify_s"] for x in s) / rounds,
            "wait s/rnd": sum(x.get("wait_s", 0.0) for x in s) / rounds,  # transport, a verdict waiting on drafting
            "fwd/rnd": sum(x.get("draft_forwards", 0) for x in s) / rounds,  # draft forwards per round
            "exp/node": _ratio(sum(x.get("nodes_expanded", 0) for x in s), sum(x.get("nodes_sent", 0) for x in s)),
            "carried": _mean_or_none(x.get("carried_nodes_mean") for x in s),  # tree nodes kept from the last round
            "tree size": statistics.fmean(x["mean_tree_size"] for x in s),
            "tree depth": statistics.fmean(x["mean_tree_depth"] for x in s),
            "hit rate": statistics.fmean(x["overlap_hit_rate"] for x in s),
            "GB/pass": _mean_or_none(x.get("read_gb_per_pass") or None for x in s),  # disk-streamed targets
            "GB/s": _mean_or_none(x.get("read_gbps") or None for x in s),
            "verifier MB": max((x.get("verifier_peak_rss_mb") or 0.0 for x in s), default=0.0) or None,
            "picked": sorted({x["budget"] for x in s}) if budget in ("auto", "default") else None,
        })
    base = {(r["set"], r["temp"]): r for r in rows if r["method"] == BASELINE}
    for r in rows:
        b = base.get((r["set"], r["temp"]))
        r["speedup"] = r["tok/s"] / b["tok/s"] if b and b["tok/s"] else None  # no baseline in this run
        r["decode speedup"] = (r["decode tok/s"] / b["decode tok/s"] if b and b["decode tok/s"]
                               and r["decode tok/s"] is not None else None)
    order = {m: i for i, m in enumerate(["specexec", "specinfer", "chain", "hf-assisted", BASELINE])}
    rows.sort(key=lambda r: (r["set"], r["temp"], order.get(method_shape(r["method"])[0], 9), r["method"],
                             str(r["budget"]).zfill(6)))
    return rows


def reference_gen_rate(records: Iterable[Record]) -> float | None:
    """gen_rate counted the SpecExec reference's way: per prompt, the first round (the prefill)
    dropped and a final stop token not counted, tokens over target passes; then the mean over
    prompts. None when no prompt ran past its first round (or rounds were not recorded)."""
    rates = []
    for r in records:
        later = r.rounds[1:]
        if not later:
            continue
        tokens = sum(x["accepted"] for x in later) - (r.stats.get("finish_reason") == "stop")
        rates.append(tokens / len(later))
    return statistics.fmean(rates) if rates else None


def _ratio(a, b):
    return a / b if b else None


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def format_table(rows: list[dict]) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
    def budget_cell(r):  # `auto` and `default` show what they picked
        return f"{r['budget']}({','.join(map(str, r['picked']))})" if r.get("picked") else cell(r["budget"])
    table = [list(COLUMNS)] + [[budget_cell(r) if c == "budget" else cell(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = [" | ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def make_runner(pipe, spec: BenchSpec, tree: TreeConfig, overlap: bool, hf_target=None) -> Runner:
    """The runner over `pipe` (a launch.pipeline.Pipeline): our methods through the pipeline,
    `hf-assisted` through transformers on `hf_target` (the target model, in this process)."""

    def run(prompt_ids, method, budget, temperature, context=None):
        sampling = SamplingParams(temperature, spec.top_p if temperature > 0 else 1.0, spec.seed)
        if method == "hf-assisted":
            return hf_assisted.generate(hf_target, pipe.draft.model, prompt_ids, spec.max_new_tokens, sampling,
                                        pipe.stop_ids)
        name, own = method_shape(method)
        chosen = budget in ("auto", "default")
        shape = replace(tree, method=name, budget=0 if name == BASELINE else DEFAULT_BUDGET if chosen else budget)
        if own:
            shape = replace(shape, branch_width=own[0], max_depth=own[1])
        options = RunOptions(shape, sampling, spec.max_new_tokens, overlap, budget == "auto",
                             budget_default=budget == "default")
        return pipe.generate(prompt_ids, options, context=context)
    return run
