"""`specexec` command line: parsing only.

Each option group becomes one small frozen dataclass (`ModelOptions`, `TreeChoice`,
`SamplingParams`, `PlacementOptions`, `LinkOptions`) handed whole to the commands, which pass
them to the process side that does the work: `launch.drafting` (generate, chat, bench),
`launch.serving` (serve, profile). Model code is imported inside the commands, so each
process loads only its own side.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from dataclasses import dataclass

import click

from specexec.drafter.tree_config import DEFAULT_BUDGET, DEFAULT_MAX_NEW_TOKENS, METHODS, OFFLOADED_BUDGET, TreeConfig
from specexec.launch import model_store
from specexec.launch.options import DEFAULT_BIND, LinkOptions, ModelOptions, PlacementOptions
from specexec.protocol.sampling import SamplingParams
from specexec.protocol.security import MAX_CONNECTIONS

DTYPE_CHOICE = click.Choice(["auto", "bfloat16", "float32"])


def _fail(message: str):
    raise click.ClickException(message)


class BudgetType(click.ParamType):
    """A positive tree budget, `auto` (the tuner picks it after a warm-up), or `default` (16, or
    OFFLOADED_BUDGET where the verifier's target streams its weights)."""

    name = "N|auto|default"

    def convert(self, value, param, ctx):
        if value in ("auto", "default") or isinstance(value, int) and value >= 1:
            return value
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a positive integer nor 'auto' or 'default'", param, ctx)
        if number < 1:
            self.fail(f"{number} is not a positive budget", param, ctx)
        return number


BUDGET = BudgetType()


@dataclass(frozen=True)
class TreeChoice:
    """The tree options as given: a TreeConfig, and whether `--budget auto` picks its budget or the
    default one (`default`: the verifier's placement decides, RunOptions.placed)."""

    config: TreeConfig
    auto: bool = False
    default: bool = False

    @classmethod
    def build(cls, method, budget, max_n_beams, branch_width, max_depth, ngram=TreeConfig.ngram) -> "TreeChoice":
        auto, default = budget == "auto", budget == "default"
        size = 0 if method == "autoregressive" else DEFAULT_BUDGET if auto or default else budget
        try:
            return cls(TreeConfig(method, size, max_n_beams, branch_width, max_depth, ngram=ngram), auto, default)
        except ValueError as err:
            raise click.BadParameter(str(err))

    def run_options(self, sampling: SamplingParams, max_new_tokens: int, overlap: bool):
        from specexec.drafter.session import RunOptions
        return RunOptions(self.config, sampling, max_new_tokens, overlap, self.auto, budget_default=self.default)


def option_group(name: str, build, *options):
    """Options that reach the command as one object `name` = build(**their values)."""
    probe = click.command()(lambda **_: None)
    for opt in options:
        probe = opt(probe)
    keys = [p.name for p in probe.params]

    def wrap(fn):
        @functools.wraps(fn)
        def command(*args, **kwargs):
            kwargs[name] = build(**{k: kwargs.pop(k) for k in keys})
            return fn(*args, **kwargs)
        for opt in reversed(options):
            command = opt(command)
        return command
    return wrap


model_options = option_group(
    "models", ModelOptions,
    click.option("--draft", default=None, metavar="MODEL",
                 help="Draft model: Hugging Face id or local directory (default: the default pair's)."),
    click.option("--target", default=None, metavar="MODEL",
                 help="Target model: Hugging Face id or local directory (default: the default pair's)."),
    click.option("--dtype", type=DTYPE_CHOICE, default=ModelOptions.dtype, show_default=True,
                 help="auto: bf16 where the device computes it natively, else float32."),
    click.option("--draft-dtype", type=click.Choice(["auto", "int8", "bfloat16", "float32"]),
                 default=ModelOptions.draft_dtype,
                 show_default=True,
                 help="Draft weights. auto: int8 on a CPU that runs it (the draft only proposes; output is "
                      "unchanged), else like --dtype."),
)

tree_options = option_group(
    "tree", TreeChoice.build,
    click.option("--method", type=click.Choice(METHODS), default="specexec", show_default=True),
    click.option("--budget", type=BUDGET, default="default", show_default=True,
                 help=f"Draft tree size (nodes sent per round); auto: measure and pick the fastest; default: "
                      f"{DEFAULT_BUDGET}, or {OFFLOADED_BUDGET} when the verifier's target streams its weights "
                      "(offloaded)."),
    click.option("--max-n-beams", type=click.IntRange(min=1), default=TreeConfig.max_n_beams, show_default=True,
                 help="Tree nodes expanded per draft forward."),
    click.option("--branch-width", type=click.IntRange(min=1), default=TreeConfig.branch_width, show_default=True,
                 help="Children considered per expanded node."),
    click.option("--max-depth", type=click.IntRange(min=1), default=TreeConfig.max_depth, show_default=True),
    click.option("--ngram/--no-ngram", default=TreeConfig.ngram, show_default=True,
                 help="Add prompt-lookup branches (continuations found earlier in the text) to SpecExec trees at "
                      "no draft cost; verified like any node, so the output is unchanged."),
)

sampling_options = option_group(
    "sampling", SamplingParams,
    click.option("--temperature", type=click.FloatRange(min=0.0), default=SamplingParams.temperature, show_default=True,
                 help="0 decodes greedily."),
    click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=SamplingParams.top_p,
                 show_default=True),
    click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=SamplingParams.seed, show_default=True),
    click.option("--top-k", type=click.IntRange(min=0), default=SamplingParams.top_k, show_default=True,
                 help="Keep the k most probable tokens (0: all); applied by the verifier, lossless."),
    click.option("--min-p", type=click.FloatRange(min=0.0, max=1.0), default=SamplingParams.min_p, show_default=True,
                 help="Drop tokens below min-p times the most probable one's probability (0: none)."),
    click.option("--repetition-penalty", type=click.FloatRange(min=0.0, min_open=True),
                 default=SamplingParams.repetition_penalty, show_default=True,
                 help="Divide the logits of tokens already in the context by this (multiply if negative), as "
                      "transformers does; applied to the target's and the draft's alike, so still lossless."),
)

system_option = click.option("--system", default=None, metavar="TEXT",
                             help="System message, put first through the chat template.")

max_new_tokens_option = click.option("--max-new-tokens", type=click.IntRange(min=1), default=DEFAULT_MAX_NEW_TOKENS,
                                     show_default=True)

placement_options = option_group(
    "placement", PlacementOptions,
    click.option("--device", default=PlacementOptions.device, show_default=True, metavar="cpu|cuda|cuda:N|auto",
                 help="Where the target computes (verifier side)."),
    click.option("--max-memory", default=None, metavar="DEV=SIZE,...",
                 help="accelerate max_memory per device, e.g. cuda:0=20GiB,cpu=64GiB; the rest goes to disk."),
    click.option("--offload-folder", type=click.Path(file_okay=False), default=None,
                 help="Where weights that fit nowhere are kept (with --max-memory)."),
    click.option("--offload", type=click.Choice(["none", "stream", "disk", "accelerate"]), default=PlacementOptions.offload,
                 show_default=True,
                 help="stream: decoder layers in pinned CPU memory, prefetched to the GPU layer by layer. disk: a CPU "
                      "target over its --max-memory cpu= budget reads the layers that do not fit from "
                      "--offload-folder every pass, ahead of the computation, bypassing the page cache (the default "
                      "when --max-memory and --offload-folder are given). accelerate: accelerate's own offload."),
)

link_options = option_group(
    "link", LinkOptions,
    click.option("--connect", default=None, metavar="ADDRESS",
                 help="Use the verifier at ADDRESS (e.g. tcp://gpu-box:5555) instead of starting one."),
    click.option("--in-process", is_flag=True, help="Run the target in this process (no verifier process)."),
    click.option("--overlap/--no-overlap", default=None,
                 help="Keep drafting while the target verifies. Default: on when the verifier does not compute "
                      "on this CPU all the time (--connect, a CUDA device, or an offloaded target); off when "
                      "both share this CPU."),
    click.option("--key-file", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="Shared HMAC key for --connect."),
    click.option("--curve-dir", type=click.Path(exists=True, file_okay=False), default=None,
                 help="CURVE keys for --connect (see `specexec keys generate`)."),
    click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=LinkOptions.timeout_s, show_default=True,
                 help="Seconds without a connection to the verifier before giving up."),
    click.option("--threads", type=click.IntRange(min=1), default=None,
                 help="Torch threads per process (default: 1 each with overlap, else all cores)."),
)


@contextlib.contextmanager
def pipeline(models: ModelOptions, link: LinkOptions, placement: PlacementOptions, needs_draft: bool = True,
             budget_auto: bool = False, simulate_bus_gbps: float | None = None, cap=None):
    """The drafter's pipeline for a command, with its set-up errors as one-line CLI errors."""
    from specexec.launch.drafting import PipelineError, open_pipeline
    try:
        with open_pipeline(models, link, placement, needs_draft, budget_auto, simulate_bus_gbps, cap) as pipe:
            yield pipe
    except PipelineError as err:
        _fail(str(err))


def overlap_for(link: LinkOptions, placement: PlacementOptions) -> bool:
    from specexec.launch.drafting import resolve_overlap
    return resolve_overlap(link, placement)


def _needs_plot_extra(ctx, param, value):
    """--plot needs matplotlib, an optional extra: say so before any work is done."""
    import importlib.util
    if value and importlib.util.find_spec("matplotlib") is None:
        raise click.BadParameter("needs matplotlib: pip install 'specexec[plot]'")
    return value


@click.group(context_settings={"auto_envvar_prefix": "SPECEXEC"})
@click.version_option(package_name="specexec", prog_name="specexec")
@click.option("-v", "--verbose", count=True, help="More log output (-v: info, -vv: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Errors only in the log.")
def main(verbose, quiet):
    """SpecExec speculative decoding: a draft tree per round, verified by the target in one pass.

    Every option can also be set in the environment as SPECEXEC_<COMMAND>_<OPTION>, e.g.
    SPECEXEC_API_PORT=8080 or SPECEXEC_GENERATE_BUDGET=32 (the command line wins)."""
    set_log_level(verbose, quiet)


def set_log_level(verbose: int, quiet: bool) -> None:
    """-q: errors only; -v: info; -vv: debug (ours and the libraries'); neither: as configured."""
    import logging
    if not (verbose or quiet):
        return
    level = logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(level)


@main.command()
@click.argument("prompt")
@model_options
@tree_options
@max_new_tokens_option
@sampling_options
@link_options
@placement_options
@click.option("--chat/--raw", default=None,
              help="Apply the target's chat template (default: when there is one).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@system_option
def generate(prompt, models, tree, max_new_tokens, sampling, link, placement, chat, as_json, system):
    """Generate a continuation of PROMPT, streaming it as rounds are accepted."""
    import dataclasses
    from specexec.launch.api import open_llm
    from specexec.launch.drafting import PipelineError
    if system is not None and chat is False:
        raise click.BadParameter("a system message needs the chat template; drop --raw", param_hint="--system")
    try:
        llm = open_llm(models, link, placement, tree)
    except PipelineError as err:
        _fail(str(err))
    with llm:
        try:
            request = llm.request(prompt, max_new_tokens, chat=chat, system=system, **dataclasses.asdict(sampling))
            done = llm.run(request, None if as_json else _write)
        except ValueError as err:  # a bad prompt, or one that leaves no room in the target's context
            _fail(str(err))
    _report(done, as_json)
    sys.exit(130 if done.finish_reason == "interrupted" and not done.error else 1 if done.error else 0)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _report(done, as_json: bool) -> None:
    """The JSON object, or the stats line on stderr after the text; then why it stopped early."""
    if as_json:
        out = {"text": done.text, "token_ids": done.token_ids, "prompt_tokens": done.prompt_tokens,
               "stats": done.stats}
        if done.error or done.finish_reason == "interrupted":
            out["error"] = done.error or "interrupted"
        click.echo(json.dumps(out))
    else:
        _write("\n")
        if "draft_s" in done.stats:  # a whole run's stats (a run cut short counts fewer)
            click.echo(format_stats(done.stats), err=True)
    if done.finish_reason == "context":
        click.echo(f"[stopped after {len(done.token_ids)} tokens: the target's context is full]", err=True)
    elif not as_json and (done.error or done.finish_reason == "interrupted"):
        click.echo(f"[stopped after {len(done.token_ids)} tokens: {done.error or 'interrupted'}; the text above "
                   "is kept]", err=True)


def format_stats(s: dict) -> str:
    line = (f"{s['new_tokens']} tokens in {s['wall_s']:.2f} s ({s['tokens_per_s']:.2f} tok/s) | "
            f"{s['target_forwards']} target passes, {s['gen_rate']:.2f} tokens/pass | "
            f"draft {s['draft_s']:.2f} s, verify {s['verify_s']:.2f} s | {s['method']}"
            + (f" budget {s['budget']}" if s["method"] != "autoregressive" else ""))
    if "bytes_sent" in s:
        line += f" | wire {s['bytes_sent'] + s['bytes_received']} B, transport {s['transport_s'] * 1e3:.1f} ms"
    return line


@main.command()
@model_options
@tree_options
@max_new_tokens_option
@sampling_options
@link_options
@placement_options
@system_option
def chat(models, tree, max_new_tokens, sampling, link, placement, system):
    """Interactive chat; both models stay loaded between turns. Empty line or Ctrl-D ends it."""
    options = tree.run_options(sampling, max_new_tokens, overlap_for(link, placement))
    with pipeline(models, link, placement, tree.config.method != "autoregressive", tree.auto) as pipe:
        chat_loop(pipe, options, system)


def chat_loop(pipe, options, system: str | None = None) -> None:
    from specexec.drafter.streaming import TextStream
    history: list[dict] = [] if system is None else [{"role": "system", "content": system}]
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        try:
            prompt_ids = pipe.encode_chat(history)
        except ValueError as err:
            _fail(str(err))
        stream = TextStream(pipe.tokenizer, pipe.stop_ids)
        sys.stdout.write("assistant> ")
        try:
            result = pipe.generate(prompt_ids, options,
                                   lambda toks: (sys.stdout.write(stream.push(toks)), sys.stdout.flush()),
                                   context="chat")
        except KeyboardInterrupt:
            sys.stdout.write("\n[interrupted]\n")
            history.append({"role": "assistant", "content": stream.text()})
            continue
        sys.stdout.write("\n")
        click.echo(format_stats(result.stats.summary()), err=True)
        history.append({"role": "assistant", "content": stream.text()})
        if result.error:
            click.echo(f"[stopped: {result.error}]", err=True)
            break
        if result.finish_reason == "context":
            click.echo("[the target's context is full: start a new chat]", err=True)
            break


@main.command()
@model_options
@tree_options
@link_options
@placement_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True)
@click.option("--max-queued", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests waiting for the model before new ones are answered 429.")
@click.option("--model-name", default=None, help="Model id reported by /v1/models (default: the target's).")
def api(models, tree, link, placement, host, port, max_queued, model_name):
    """OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models, /health,
    /metrics); the models are loaded once, requests are served one at a time in arrival order."""
    try:
        from specexec.launch.openai_server import serve
    except ImportError as err:
        _fail(f"the HTTP server needs fastapi, uvicorn and prometheus_client ({err}); pip install 'specexec'")
    from specexec.launch.drafting import PipelineError
    try:
        serve(models, link, placement, tree, host, port, max_queued, model_name)
    except (PipelineError, RuntimeError) as err:
        _fail(str(err))


def _read_key(key_file):
    from specexec.launch.drafting import read_key
    try:
        return read_key(key_file)
    except ValueError as err:
        _fail(str(err))


@main.command()
@click.option("--target", default=None, metavar="MODEL")
@click.option("--bind", default=DEFAULT_BIND, show_default=True,
              help="Where to listen: tcp://HOST:PORT or ipc://PATH. Loopback unless told otherwise.")
@click.option("--dtype", type=DTYPE_CHOICE, default="auto", show_default=True)
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Shared HMAC key: every message must be signed with it.")
@click.option("--curve-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Encrypt and authenticate with CURVE (see `specexec keys generate`).")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback bind without a key.")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--max-sessions", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-cached-tokens", type=click.IntRange(min=1), default=1 << 18, show_default=True,
              help="KV cache budget over all sessions; least recently used sessions are evicted.")
@click.option("--idle-timeout", "idle_timeout_s", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds after which an idle session's cache is freed.")
@click.option("--max-connections", type=click.IntRange(min=1), default=MAX_CONNECTIONS, show_default=True,
              help="Connections held at once; one arriving while the cap is full is closed at once.")
@click.option("--budget", type=click.Choice(["auto"]), default=None,
              help="auto: profile the forward cost at start-up so drafters can use --budget auto.")
@click.option("--simulate-bus-gbps", type=click.FloatRange(min=0, min_open=True), default=None,
              help="After each forward, wait as long as moving the weights over a bus of this speed takes.")
@placement_options
@click.option("--exit-with-parent", is_flag=True, hidden=True)
def serve(target, key_file, budget, **options):
    """Host the target model for drafters on the network (or on this machine)."""
    import zmq
    from specexec.launch.serving import ServeOptions, serve as run_server
    try:
        settings = ServeOptions(model_store.resolve(target, model_store.TARGET), key=_read_key(key_file),
                                profile=budget == "auto", **options)
        run_server(settings)
    except (model_store.ModelStoreError, ValueError) as err:
        _fail(str(err))
    except zmq.ZMQError as err:
        _fail(f"cannot bind {options['bind']}: {err}")


def _csv(kind):
    def parse(ctx, param, value):
        try:
            return tuple(kind(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {kind.__name__} values, got {value!r}")
    return parse


def _budgets(ctx, param, value):
    out = []
    for v in value.split(","):
        v = v.strip()
        if v:
            try:
                out.append(BUDGET.convert(v, param, ctx))
            except click.BadParameter:
                raise click.BadParameter(f"budgets are positive integers, 'auto' or 'default', got {v!r}")
    return tuple(out)


BENCH_METHODS = METHODS + ("hf-assisted",)


@main.command()
@model_options
@click.option("--prompts", "prompt_sets", default="oasst", show_default=True,
              help="Comma-separated prompt sets: oasst, c4, wikitext, humaneval, or JSON/JSONL files.")
@click.option("--n-prompts", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--template", type=click.Choice(["auto", "raw", "chat"]), default="auto", show_default=True,
              help="How prompts reach the target: raw text as the SpecExec reference feeds it, or the target's "
                   "chat template; auto: chat for chat sets (oasst), raw for the others (HumanEval, c4, files).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--methods", default="specexec,autoregressive", show_default=True, callback=_csv(str),
              help=f"Any of {', '.join(BENCH_METHODS)}; a tree method may take a shape of its own, "
                   "WIDTHxDEPTH (e.g. specinfer:4x8: 4 chains x depth 8) in place of --branch-width/--max-depth.")
@click.option("--budgets", default="16,32,64", show_default=True, callback=_budgets,
              help="Tree budgets, e.g. 16,32,auto,default (default: what --budget's default picks for this "
                   "verifier's placement).")
@click.option("--temperatures", default="0", show_default=True, callback=_csv(float))
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=0.9, show_default=True,
              help="Applied at temperatures above 0.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--max-n-beams", type=click.IntRange(min=1), default=TreeConfig.max_n_beams, show_default=True)
@click.option("--branch-width", type=click.IntRange(min=1), default=TreeConfig.branch_width, show_default=True)
@click.option("--max-depth", type=click.IntRange(min=1), default=TreeConfig.max_depth, show_default=True)
@click.option("--simulate-bus-gbps", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Add, after each target forward, the time moving the target's weights over this bus takes.")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write one JSON record per prompt and run (JSONL).")
@click.option("--plot", type=click.Path(dir_okay=False, writable=True), default=None, callback=_needs_plot_extra,
              help="Write a PNG: gen_rate and tokens/s against budget.")
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="Run every configuration once on a short prefix first (first forwards of a shape are slow); "
                   "skip it where a target pass costs seconds (an offloaded target).")
@click.option("--verifier-memory-cap", "memory_cap", default=None, metavar="SIZE",
              help="Run the verifier started here in a memory cgroup of SIZE (e.g. 1800M) that counts the page "
                   "cache, its model files dropped from the cache first: the offloaded regime measured honestly.")
@click.option("--verifier-read-bps", "read_bps", type=click.IntRange(min=1), default=None,
              help="With --verifier-memory-cap: throttle the verifier's reads from the model's disks (bytes/s).")
@link_options
@placement_options
def bench(models, prompt_sets, n_prompts, template, max_new_tokens, methods, budgets, temperatures, top_p, seed,
          max_n_beams, branch_width, max_depth, simulate_bus_gbps, out, plot, warmup, memory_cap, read_bps, link,
          placement):
    """Measure gen_rate and tokens/s per method, budget and temperature, side by side."""
    from specexec.launch import bench as benchmod
    from specexec.launch import prompts as promptmod
    try:
        bad = [m for m in methods if benchmod.method_shape(m)[0] not in BENCH_METHODS]
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--methods")
    if bad:
        raise click.BadParameter(f"unknown method {bad[0]!r}; expected any of {', '.join(BENCH_METHODS)}",
                                 param_hint="--methods")
    if any(t < 0 for t in temperatures):
        raise click.BadParameter("temperatures must be >= 0", param_hint="--temperatures")
    if simulate_bus_gbps and link.connect:
        raise click.BadParameter("--simulate-bus-gbps applies to a verifier started here; pass it to "
                                 "`specexec serve` instead", param_hint="--simulate-bus-gbps")
    if simulate_bus_gbps and "hf-assisted" in methods:
        raise click.BadParameter("hf-assisted cannot be run with --simulate-bus-gbps", param_hint="--methods")
    sets = {}
    try:
        for name in filter(None, (n.strip() for n in prompt_sets.split(","))):
            sets[name] = promptmod.load(name)[:n_prompts]
        benchmod.check_prompt_sets(sets)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--prompts")
    spec = benchmod.BenchSpec(tuple(methods), tuple(budgets), tuple(temperatures), top_p, max_new_tokens, seed,
                              warmup=warmup, max_depth=max_depth)
    shape = TreeConfig(max_n_beams=max_n_beams, branch_width=branch_width, max_depth=max_depth)
    needs_draft = any(m != "autoregressive" for m in methods)
    simulated = f" (simulated bus {simulate_bus_gbps:g} GB/s)" if simulate_bus_gbps else ""
    overlap = overlap_for(link, placement)
    cap = _cap_options(memory_cap, read_bps, models, placement)
    with pipeline(models, link, placement, needs_draft, "auto" in budgets, simulate_bus_gbps, cap) as pipe:
        try:
            ids = {name: [p.render(pipe.tokenizer, template, pipe.chat_template) for p in ps]
                   for name, ps in sets.items()}
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--template")
        templates = {name: ps[0].resolve(template) for name, ps in sets.items() if ps}
        pids = {name: [p.id for p in ps] for name, ps in sets.items()}
        hf_target = _hf_target(pipe, models) if "hf-assisted" in methods else None
        runner = benchmod.make_runner(pipe, spec, shape, overlap, hf_target)
        with open(out, "w") if out else contextlib.nullcontext() as sink:
            records = benchmod.run_bench(runner, ids, pids, spec,
                                         (lambda r: (sink.write(r.to_json() + "\n"), sink.flush())) if sink else None,
                                         templates)
    rows = benchmod.summarize(records)
    if simulated:
        click.echo(f"all target timings below are simulated:{simulated}")
    click.echo(benchmod.format_table(rows))
    if plot:
        from specexec.launch.bench_plot import plot as draw
        draw(rows, plot, f"specexec bench{simulated}")
        click.echo(f"plot: {plot}")


def _cap_options(memory_cap, read_bps, models: ModelOptions, placement: PlacementOptions):
    """The cgroup for a verifier started here: the target's files and offload folder are what it streams."""
    if memory_cap is None:
        if read_bps:
            raise click.BadParameter("needs --verifier-memory-cap", param_hint="--verifier-read-bps")
        return None
    from specexec.launch.memory_cap import CapOptions, parse_size
    try:
        parse_size(memory_cap)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--verifier-memory-cap")
    paths = [model_store.resolve(models.target, model_store.TARGET)]
    if placement.offload_folder:
        os.makedirs(placement.offload_folder, exist_ok=True)
        paths.append(placement.offload_folder)
    return CapOptions(memory_cap, read_bps, tuple(paths))


def _hf_target(pipe, models: ModelOptions):
    """The target for transformers' assisted generation: the pipeline's, or loaded here if it is remote."""
    if pipe.target_model is not None:
        return pipe.target_model
    from specexec.launch.loading import load_causal_lm, resolve_dtype
    path = model_store.resolve(models.target, model_store.TARGET)
    return load_causal_lm(path, resolve_dtype(models.dtype, path))


@main.command("bench-wire")
@click.option("--sizes", default="64,256,1024", show_default=True, callback=_csv(int))
@click.option("--trials", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--target", default=None, metavar="MODEL", help="Target whose forward time the wire is compared to.")
@click.option("--dtype", type=DTYPE_CHOICE, default="auto", show_default=True)
@click.option("--no-forward", is_flag=True, help="Only time the wire.")
def bench_wire(sizes, trials, target, dtype, no_forward):
    """Per-round transport cost (encode + send + receive + decode) for trees of given sizes."""
    from specexec.launch import wire_bench
    rows = wire_bench.measure(sizes, trials)
    if not no_forward:
        from specexec.launch.serving import target_for_timing
        try:
            model = target_for_timing(model_store.resolve(target, model_store.TARGET), dtype)
        except model_store.ModelStoreError as err:
            _fail(str(err))
        for row in rows:
            row.forward_ms = wire_bench.target_forward_ms(model, row.nodes)
    click.echo(wire_bench.format_rows(rows))


@main.command()
@click.option("--target", default=None, metavar="MODEL")
@click.option("--dtype", type=DTYPE_CHOICE, default="auto", show_default=True)
@click.option("--sizes", default="1,4,16,64,256,1024", show_default=True, callback=_csv(int))
@click.option("--prefix", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tokens already in the KV cache when the tree arrives.")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--simulate-bus-gbps", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--plot", type=click.Path(dir_okay=False, writable=True), default=None, callback=_needs_plot_extra)
@placement_options
def profile(target, plot, **options):
    """The target's forward time against the number of tokens, in the chosen placement."""
    from specexec.launch.profile_cache import format_curve
    from specexec.launch.serving import ProfileOptions, profile as run_profile
    from specexec.verifier.placement import peak_rss_mb
    try:
        result = run_profile(ProfileOptions(model_store.resolve(target, model_store.TARGET), **options))
    except (model_store.ModelStoreError, ValueError) as err:
        _fail(str(err))
    click.echo(result.placement_text)
    click.echo(format_curve(result.curve, result.title))
    if result.limit is not None:
        click.echo(result.describe_limit())
    click.echo(f"peak resident memory: {peak_rss_mb():.0f} MiB")
    if plot:
        from specexec.launch.bench_plot import plot_curve
        plot_curve(result.curve, result.title, plot)
        click.echo(f"plot: {plot}")


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


@models.command("prune")
def models_prune():
    """Delete the downloaded wheels and GGUF of converted models (the converted models stay)."""
    for model in model_store.PACKAGED.values():
        freed = model_store.prune(model)
        state = f"freed {freed / 1e9:.2f} GB" if model_store.is_converted(model) else "not converted: kept"
        click.echo(f"{model.name:32s} {state}")


@models.command("rm")
@click.argument("name", type=click.Choice(sorted(model_store.PACKAGED)))
def models_rm(name):
    """Delete everything the cache holds for model NAME (wheels, GGUF, converted model)."""
    freed = model_store.remove(model_store.PACKAGED[name])
    click.echo(f"{name}: freed {freed / 1e9:.2f} GB")


@main.group()
def keys():
    """Keys for running a verifier on a network."""


@keys.command("generate")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite keys already in DIRECTORY.")
def keys_generate(directory, force):
    """Write CURVE keypairs for a verifier and a drafter, and a shared HMAC key, into DIRECTORY
    (secret files readable by their owner only)."""
    from specexec.protocol.security import KeyExistsError, generate_keys
    try:
        d = generate_keys(directory, force=force)
    except (KeyExistsError, OSError) as err:
        _fail(str(err))
    click.echo(f"wrote {d}/server.key[_secret], {d}/client.key[_secret], {d}/authorized/client.key, {d}/hmac.key")
    click.echo("GPU box:  specexec serve --bind tcp://0.0.0.0:5555 --key-file DIR/hmac.key --curve-dir DIR")
    click.echo("laptop:   copy DIR without server.key_secret, then "
               "specexec generate ... --connect tcp://GPU-BOX:5555 --key-file DIR/hmac.key --curve-dir DIR")


if __name__ == "__main__":
    main()
