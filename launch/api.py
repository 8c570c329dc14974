"""The Python API: `specexec.load(...)` returns an `LLM` whose models stay loaded between calls.

    import specexec
    with specexec.load(in_process=True) as llm:
        print(llm.generate("Write a haiku about trees", max_new_tokens=64).text)
        for piece in llm.stream([{"role": "user", "content": "Hi"}]):
            print(piece, end="", flush=True)

Options take the CLI's names and the defaults of the option dataclasses (`ModelOptions`,
`LinkOptions`, `PlacementOptions`, `TreeConfig`, `SamplingParams`): one home for each default.
Generations run one at a time, in arrival order, on one worker thread (`Scheduler`): the
pipeline has one draft model. The HTTP server (`launch.http`) submits to the same queue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from specexec.drafter.tree_config import TreeConfig
from specexec.launch.options import LinkOptions, ModelOptions, PlacementOptions
from specexec.protocol.link import LinkError

TREE_FIELDS = ("method", "budget", "max_n_beams", "branch_width", "max_depth")


class Busy(RuntimeError):
    """The request queue is full; try again later."""


class PromptTooLong(ValueError):
    """The prompt leaves no room in the target's context."""


class _Cancelled(Exception):
    """Raised inside the pipeline's token callback to end a generation between rounds."""


class _StopString(Exception):
    """Raised inside the token callback when a stop string appeared."""


# -- the outcome of one generation ------------------------------------------------------------

@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length", "context" or "interrupted"
    prompt_tokens: int
    stats: dict = field(default_factory=dict)  # `generate --json`'s stats
    error: str | None = None


def is_last(event: object) -> bool:
    """One event from a job's sink: a failure is raised; the Completion is the last one."""
    if isinstance(event, BaseException):
        raise event
    return isinstance(event, Completion)


class StopMatcher:
    """Cuts streamed text before the first stop string, holding back what may start one."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # everything released so far
        self._held = ""
        self.hit = False

    def push(self, piece: str) -> str:
        """The part of `piece` (plus what was held) that is safe to release now."""
        pending = self._held + piece
        cuts = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.hit, self._held = True, ""
            out = pending[:min(cuts)]
        else:
            keep = max((k for s in self.stops for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
            out, self._held = pending[:len(pending) - keep], pending[len(pending) - keep:]
        self.text += out
        return out

    def flush(self) -> str:
        """At the end of generation, what was held back is text after all."""
        out, self._held = self._held, ""
        self.text += out
        return out


# -- requests and the queue ---------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """One generation: prompt ids and the per-request settings."""

    prompt_ids: list[int]
    options: object  # drafter.session.RunOptions
    stop: tuple[str, ...] = ()
    context: str | None = None


@dataclass
class Job:
    """A queued request; `sink` receives text pieces (str), then one Completion or an exception."""

    request: Request
    sink: Callable[[object], None]
    cancel: threading.Event = field(default_factory=threading.Event)


class Scheduler:
    """One generation at a time, first come first served, on one worker thread."""

    def __init__(self, run: Callable[[Job], None], max_queued: int = 0):
        self._run = run
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self.active = 0  # generations running (0 or 1)
        self._thread = threading.Thread(target=self._loop, name="specexec-generation", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self._queue.maxsize} requests are already waiting") from None

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            self.active = 1
            try:
                self._run(job)
            except BaseException as err:  # handed to the waiting caller, never lost in this thread
                with contextlib.suppress(Exception):
                    job.sink(err)
            finally:
                self.active = 0

    def close(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                job = self._queue.get_nowait()
                if job is not None:
                    job.cancel.set()
                    job.sink(RuntimeError("the model was closed"))
        self._queue.put(None)
        self._thread.join()


# -- one run ------------------------------------------------------------------------------------

class _Run:
    """The token callback of one generation: text, stop strings, cancellation, round timings."""

    def __init__(self, job: Job, tokenizer, stop_ids, on_round: Callable[[float, int], None] | None):
        from specexec.drafter.streaming import TextStream
        self.job, self.on_round = job, on_round
        self.stream = TextStream(tokenizer, stop_ids)
        self.matcher = StopMatcher(job.request.stop)
        self.ids: list[int] = []
        self.rounds = 0
        self.start = self.last = time.perf_counter()

    def __call__(self, tokens: list[int]) -> None:
        now = time.perf_counter()
        self.rounds += 1
        if self.on_round:
            self.on_round(now - self.last, len(tokens))
        self.last = now
        self.ids.extend(tokens)
        piece = self.matcher.push(self.stream.push(tokens))
        if piece:
            self.job.sink(piece)
        if self.matcher.hit:
            self._trim()
            raise _StopString
        if self.job.cancel.is_set():
            raise _Cancelled

    def _trim(self) -> None:
        """Keep the fewest tokens whose text reaches the stop string."""
        from specexec.drafter.streaming import TextStream
        for n in range(1, len(self.ids) + 1):
            probe = TextStream(self.stream.tokenizer, self.stream.skip_ids)
            probe.push(self.ids[:n])
            if len(probe.text()) >= len(self.matcher.text) and any(s in probe.text() for s in self.matcher.stops):
                del self.ids[n:]
                return

    def completion(self, reason: str, error: str | None = None) -> Completion:
        """The outcome of a run that ended by an exception: what was accepted, and stats counted
        here (the drafter's own are lost with the exception)."""
        wall = time.perf_counter() - self.start
        tree = self.job.request.options.tree
        stats = {"method": tree.method, "budget": tree.budget, "new_tokens": len(self.ids),
                 "target_forwards": self.rounds, "gen_rate": round(len(self.ids) / max(self.rounds, 1), 4),
                 "tokens_per_s": round(len(self.ids) / wall, 4) if wall else 0.0, "wall_s": round(wall, 4)}
        return Completion(self.matcher.text, self.ids, reason, len(self.job.request.prompt_ids), stats, error)


# -- the model ----------------------------------------------------------------------------------

class LLM:
    """A loaded pipeline and its request queue. Use `specexec.load(...)` to make one."""

    def __init__(self, pipe, stack: contextlib.ExitStack, tree, overlap: bool, max_queued: int = 0,
                 on_result: Callable[[Completion], None] | None = None,
                 on_round: Callable[[float, int], None] | None = None):
        self.pipe, self._stack, self.tree, self.overlap = pipe, stack, tree, overlap
        self.on_result, self.on_round = on_result, on_round
        self.scheduler = Scheduler(self._run, max_queued)
        self._closed = False
        self.last_round_at = 0.0  # time.monotonic() of the last accepted round: the verifier answered then
        self.last_error: str | None = None  # the last generation's link error, if any

    # the public calls

    def generate(self, prompt, **settings) -> Completion:
        """One answer. `prompt`: text, or chat messages [{"role", "content"}]. Settings: max_new_tokens,
        temperature, top_p, top_k, min_p, repetition_penalty, seed, stop (str or list), chat (None: the template when there is one),
        system, method, budget, context."""
        done = None
        for item in self._events(self.request(prompt, **settings)):
            done = item
        return done

    def stream(self, prompt, **settings) -> Iterator[str]:
        """Text pieces as rounds are accepted; closing the iterator (or Ctrl-C) stops generation."""
        with contextlib.closing(self._events(self.request(prompt, **settings))) as events:
            for item in events:
                if isinstance(item, str):
                    yield item

    def run(self, request: Request, on_text: Callable[[str], None] | None = None) -> Completion:
        """Run a built `request`, handing text pieces to `on_text` as rounds are accepted. Ctrl-C
        (KeyboardInterrupt) cancels it after the round in flight and returns what was accepted,
        finish_reason "interrupted" (`specexec generate` comes here)."""
        events: queue.Queue = queue.Queue()
        job = self.submit(request, events.put)
        while True:
            try:
                item = events.get()
            except KeyboardInterrupt:
                job.cancel.set()
                continue
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Completion):
                return item
            if on_text is not None:
                on_text(item)

    def request(self, prompt, max_new_tokens: int | None = None, temperature: float | None = None,
                top_p: float | None = None, seed: int | None = None, stop=None, chat: bool | None = None,
                system: str | None = None, method: str | None = None, budget: int | None = None,
                context: str | None = None, **sampling) -> Request:
        """Encode and check one request (ValueError names what is wrong); nothing runs yet.
        `sampling` takes SamplingParams' other fields: top_k, min_p, repetition_penalty."""
        options = self.run_options(max_new_tokens, method, budget,
                                   temperature=temperature, top_p=top_p, seed=seed, **sampling)
        return Request(self.encode(prompt, chat, system), options, _stops(stop), context)

    def probe(self) -> Request:
        """One autoregressive token after a one-token prompt: does the verifier answer?"""
        return Request([0], self.run_options(1, method="autoregressive"))

    def submit(self, request: Request, sink: Callable[[object], None]) -> Job:
        """Queue `request`; `sink` gets text pieces, then a Completion (or an exception). Raises Busy."""
        if self._closed:
            raise RuntimeError("this model is closed")
        job = Job(request, sink)
        self.scheduler.submit(job)
        return job

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.scheduler.close()
            self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # building requests

    def encode(self, prompt, chat: bool | None = None, system: str | None = None) -> list[int]:
        if isinstance(prompt, str):
            if system is None:
                return self.pipe.encode(prompt, chat)
            prompt = [{"role": "user", "content": prompt}]
        messages = _messages(prompt)
        if system is not None:
            messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
        if not self.pipe.chat_template:
            raise ValueError("this tokenizer has no chat template: pass the prompt as text")
        return self.pipe.encode_chat(messages)

    def run_options(self, max_new_tokens: int | None = None, method: str | None = None,
                    budget: int | None = None, **sampling):
        from specexec.drafter.session import RunOptions
        from specexec.protocol.sampling import SamplingParams
        tree = self.tree.config
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)):
            raise ValueError(f"budget must be a positive integer per request, got {budget!r}")
        if method is not None or budget is not None:
            if method not in (None, tree.method) and method != "autoregressive" and self.pipe.draft is None:
                raise ValueError(f"method {method} needs a draft model; this server was started without one")
            chosen = method or tree.method
            size = 0 if chosen == "autoregressive" else budget if budget is not None else tree.budget or \
                TreeConfig.budget
            tree = dataclasses.replace(tree, method=chosen, budget=size)
        params = SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
        kwargs = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        auto = self.tree.auto and budget is None and tree.method != "autoregressive"
        default = self.tree.default and budget is None
        return RunOptions(tree, params, overlap=self.overlap, budget_auto=auto, first_token_alone=True,
                          budget_default=default, **kwargs)

    # the worker's side

    def _events(self, request: Request) -> Iterator[object]:
        """Submit and relay the job's events; leaving early (close, Ctrl-C) cancels it."""
        events: queue.Queue = queue.Queue()
        job = self.submit(request, events.put)
        try:
            while True:
                item = events.get()
                last = is_last(item)
                yield item
                if last:
                    return
        finally:
            job.cancel.set()

    def _run(self, job: Job) -> None:
        if job.cancel.is_set():
            job.sink(Completion("", [], "interrupted", len(job.request.prompt_ids)))
            return
        done = self._generate(job.request, _Run(job, self.pipe.tokenizer, self.pipe.stop_ids, self._round))
        self.last_error = done.error
        if self.on_result:
            self.on_result(done)
        job.sink(done)

    def _generate(self, req: Request, run: _Run) -> Completion:
        try:
            result = self.pipe.generate(req.prompt_ids, req.options, run, req.context)
        except LinkError as err:  # the verifier could not be reached at all
            return run.completion("interrupted", str(err))
        except _StopString:
            return run.completion("stop")
        except _Cancelled:
            return run.completion("interrupted")
        if result.finish_reason == "context" and not result.token_ids:
            raise PromptTooLong(f"the prompt ({len(req.prompt_ids)} tokens) leaves no room in the target's context")
        tail = run.matcher.flush()
        if tail:
            run.job.sink(tail)
        return Completion(run.matcher.text, result.token_ids, result.finish_reason,
                          len(req.prompt_ids), result.stats.summary(), result.error)

    def _round(self, seconds: float, tokens: int) -> None:
        self.last_round_at = time.monotonic()
        if self.on_round:
            self.on_round(seconds, tokens)


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")


def _messages(messages) -> list[dict]:
    """Chat messages, checked: a non-empty list of {"role": str, "content": str}."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


# -- loading --------------------------------------------------------------------------------------

def _pick(cls, options: dict, **given):
    """`cls` from `given` and the options that name its fields (taken out of `options`); its own
    defaults for the rest."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**given, **{k: options.pop(k) for k in list(options) if k in names})


def load(target: str | None = None, draft: str | None = None, *, max_queued: int = 0,
         simulate_bus_gbps: float | None = None, **options) -> LLM:
    """Load the pair once. Options: the CLI's, by their Python names -- method, budget (int, "auto" or
    "default"), max_n_beams, branch_width, max_depth, dtype, draft_dtype, connect, in_process, overlap,
    key_file, curve_dir, timeout_s, threads, device, max_memory, offload_folder, offload.
    Raises ValueError for bad options, `drafting.PipelineError` when the pipeline cannot start."""
    tree_kwargs = {k: options.pop(k, "default" if k == "budget" else getattr(TreeConfig, k)) for k in TREE_FIELDS}
    models = _pick(ModelOptions, options, draft=draft, target=target)
    link = _pick(LinkOptions, options)
    placement = _pick(PlacementOptions, options)
    if options:
        raise TypeError(f"unknown option(s): {', '.join(sorted(options))}")
    tree = tree_choice(**tree_kwargs)
    return open_llm(models, link, placement, tree, max_queued, simulate_bus_gbps)


def tree_choice(method, budget, max_n_beams, branch_width, max_depth):
    """The CLI's `TreeChoice`, with its click error as a ValueError."""
    import click
    from specexec.launch.cli import TreeChoice
    try:
        return TreeChoice.build(method, budget, max_n_beams, branch_width, max_depth)
    except click.ClickException as err:
        raise ValueError(err.format_message()) from None


def open_llm(models: ModelOptions, link: LinkOptions, placement: PlacementOptions, tree, max_queued: int = 0,
             simulate_bus_gbps: float | None = None, **hooks) -> LLM:
    """An LLM over `open_pipeline` with these option groups (the CLI's `api` command comes here)."""
    from specexec.launch.drafting import open_pipeline, resolve_overlap
    stack = contextlib.ExitStack()
    try:
        pipe = stack.enter_context(open_pipeline(models, link, placement, tree.config.method != "autoregressive",
                                                 tree.auto, simulate_bus_gbps))
    except BaseException:
        stack.close()
        raise
    return LLM(pipe, stack, tree, resolve_overlap(link, placement), max_queued, **hooks)
