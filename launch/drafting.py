"""The drafter's process: load the draft, reach a verifier, run generation sessions.

The verifier is one of: a `specexec serve` at `--connect`, a verifier process started here
on a private ipc socket (the default), or -- only with `--in-process` -- the target in this
very process (`launch.pipeline`, imported only then). Imports the drafter's side and the
shared loading code, never the verifier's.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from typing import Callable, Iterator

import torch

from specexec.drafter.budget_tuner import BudgetTuners
from specexec.drafter.draft_model import DraftModel
from specexec.drafter.quantize import int8_supported, quantize_int8
from specexec.drafter.remote import RemoteVerifier
from specexec.drafter.session import DraftSession, GenerationResult, RunOptions
from specexec.drafter.search_api import make_search
from specexec.launch import model_store
from specexec.launch.loading import DTYPES, encode_chat, encode_prompt, load_causal_lm, load_tokenizer, report, \
    resolve_dtype
from specexec.launch.memory_cap import CapOptions, CapUnavailable, MemoryCap
from specexec.launch.options import READY_LINE, LinkOptions, ModelOptions, PlacementOptions
from specexec.launch.profile_cache import cached_curve, profile_key
from specexec.protocol.fingerprint import tokenizer_fingerprint
from specexec.protocol.link import LinkError, VerifierLink
from specexec.protocol.messages import Hello
from specexec.protocol.sampling import SamplingParams

KEY_ENV = "SPECEXEC_HMAC_KEY"
DRAFT_DTYPES = ("auto", "int8", "bfloat16", "float32")


class PipelineError(RuntimeError):
    """The pipeline could not be set up; the message says what to change."""


class VerifierStartError(PipelineError):
    """The verifier process could not be started; the message carries its last words."""


# -- the draft model --------------------------------------------------------------------------

def resolve_draft_dtype(draft_dtype: str, dtype: str, path: str) -> str:
    """`auto`: int8 weights where this CPU runs them (the draft only proposes), else like --dtype."""
    if draft_dtype not in DRAFT_DTYPES:
        raise ValueError(f"unknown draft dtype {draft_dtype!r}; expected one of {', '.join(DRAFT_DTYPES)}")
    if draft_dtype == "int8" and not int8_supported():
        raise ValueError("--draft-dtype int8: this PyTorch build or CPU has no fast int8 linear "
                         f"(quantized engine {torch.backends.quantized.engine!r}); use float32 or bfloat16")
    if draft_dtype == "auto":
        return "int8" if int8_supported() else str(resolve_dtype(dtype, path)).removeprefix("torch.")
    return draft_dtype


def load_draft(path: str, dtype: str = "auto", draft_dtype: str = "auto") -> DraftModel:
    """The draft model for this CPU: int8 linears, or packed float32/bf16 ones."""
    chosen = resolve_draft_dtype(draft_dtype, dtype, path)
    if chosen == "int8":
        model = load_causal_lm(path, torch.float32, pack=False)
        quantize_int8(model)
    else:
        model = load_causal_lm(path, DTYPES[chosen])
    return DraftModel(model, weights=chosen)


def draft_curve(draft: DraftModel, path: str) -> dict[int, float]:
    """The draft's forward time against batch width, measured once per model, weights and threads."""
    from specexec.drafter.draft_profile import SIZES, draft_curve as measure
    return cached_curve("draft", profile_key(path, draft.weights, "cpu", sizes=list(SIZES)), lambda: measure(draft))


def check_pair(draft: DraftModel | None, target_vocab: int) -> None:
    if draft is not None and draft.vocab_size != target_vocab:
        raise ValueError(f"draft vocabulary ({draft.vocab_size}) differs from the target's "
                         f"({target_vocab}): not a usable pair")


# -- one generation ---------------------------------------------------------------------------

def draft_session(link: VerifierLink, draft: DraftModel | None, tuners: BudgetTuners, options: RunOptions,
                  context: str | None, max_context: int | None, stop_ids: frozenset[int] = frozenset(),
                  session_id: str | None = None, offloaded: bool = False) -> DraftSession:
    """The drafter's loop for one run over `link`: the method's tree search and --budget auto's choice;
    the default budget is the offloaded one where the target streams its weights (`offloaded`)."""
    options = options.placed(offloaded)
    search = None
    if options.tree.method != "autoregressive":
        if draft is None:
            raise ValueError(f"method {options.tree.method} needs a draft model")
        search = make_search(draft, options.tree, options.sampling)
    return DraftSession(link, options.tree, search, options.max_new_tokens, overlap=options.overlap,
                        session_id=session_id, auto_budget=tuners.for_run(options, context),
                        max_context=max_context, stop_ids=stop_ids, first_token_alone=options.first_token_alone)


def resolve_overlap(link: LinkOptions, placement: PlacementOptions) -> bool:
    """Unset: overlap when the verifier does not compute on the drafter's cores all the time --
    it has hardware of its own (--connect, a GPU), or it streams its weights (offloaded), where
    it mostly waits on the disk or the bus."""
    if link.overlap is not None:
        return link.overlap
    if link.in_process:
        return False
    return bool(link.connect) or placement.computes_elsewhere or placement.offloaded


def read_key(key_file: str | None) -> bytes | None:
    """The shared HMAC key: from `key_file`, else from the environment, else none."""
    from specexec.protocol.framing import key_from_env, load_key
    if key_file:
        return load_key(key_file)
    return key_from_env(os.environ.get(KEY_ENV))


# -- the remote pipeline ------------------------------------------------------------------------

class RemotePipeline:
    """Drafts here, verifies at `address`; the draft model stays loaded between prompts."""

    target_model = None  # the target lives in another process

    def __init__(self, address: str, draft_path: str | None, tokenizer_path: str, dtype: str = "auto",
                 key: bytes | None = None, curve_dir: str | None = None, timeout_s: float = 60.0,
                 draft_dtype: str = "auto", cap: MemoryCap | None = None):
        self.address, self.key, self.curve_dir, self.timeout_s = address, key, curve_dir, timeout_s
        self.cap = cap  # the cgroup of a verifier started here: its peak is the verifier's memory
        self.draft_path = draft_path
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.draft = load_draft(draft_path, dtype, draft_dtype) if draft_path is not None else None
        probe = self._link(Hello(uuid.uuid4().hex, self.fingerprint, SamplingParams(), "specexec"))
        try:
            self.welcome = probe.open()
        finally:
            probe.close()
        check_pair(self.draft, self.welcome.vocab_size)
        self.stop_ids = frozenset(self.welcome.stop_ids)
        self.offloaded = self.welcome.offloaded
        self.chat_template = self.welcome.chat_template or None
        self.tuners = BudgetTuners(self._target_curve, lambda: draft_curve(self.draft, self.draft_path), report)

    def _link(self, hello: Hello) -> RemoteVerifier:
        return RemoteVerifier(self.address, hello, self.key, self.curve_dir, self.timeout_s)

    def _target_curve(self) -> dict[int, float]:
        if not self.welcome.forward_curve:
            raise ValueError(f"the verifier at {self.address} has no forward-cost profile for --budget auto: "
                             "start it with `specexec serve --budget auto`")
        return dict(self.welcome.forward_curve)

    def encode(self, text: str, chat: bool | None) -> list[int]:
        return encode_prompt(self.tokenizer, text, chat, self.chat_template)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.tokenizer, messages, self.chat_template)

    def generate(self, prompt_ids: list[int], options: RunOptions,
                 on_tokens: Callable[[list[int]], None] | None = None, context: str | None = None
                 ) -> GenerationResult:
        """One continuation; `context` lets `--budget auto` keep its choice across related prompts."""
        session_id = uuid.uuid4().hex
        link = self._link(Hello(session_id, self.fingerprint, options.sampling, options.tree.rule))
        if self.cap:
            self.cap.reset_peak()
        try:
            link.open()
            drafter = draft_session(link, self.draft, self.tuners, options, context,
                                    self.welcome.max_context, self.stop_ids, session_id, self.offloaded)
            result = drafter.generate(prompt_ids, on_tokens)
        finally:
            link.close()
        if self.cap:
            result.stats.verifier_peak_rss_mb = round(self.cap.peak_bytes() / 2**20, 1)
            result.stats.verifier_memory = "cgroup"
        return result

    def close(self) -> None:
        """Nothing is held between generations (each opens and closes its own session)."""


class LocalVerifier:
    """`specexec serve` as a child process on a private ipc socket with a one-time HMAC key."""

    def __init__(self, target_path: str, dtype: str = "auto", threads: int | None = None,
                 extra_args: tuple[str, ...] = (), startup_timeout_s: float = 600.0,
                 cap: CapOptions | None = None):
        self.dir = tempfile.mkdtemp(prefix="specexec-")
        os.chmod(self.dir, 0o700)
        self.key = secrets.token_hex(32).encode()
        self.address = f"ipc://{self.dir}/verifier.sock"
        cmd = [sys.executable, "-m", "specexec.launch.cli", "serve", "--target", target_path, "--bind",
               self.address, "--dtype", dtype, "--exit-with-parent", *extra_args]
        if threads:
            cmd += ["--threads", str(threads)]
        # the one-time key; and none of the operator's `SPECEXEC_SERVE_*` settings, which would override
        # this command line (a key file there would lock the drafter out of its own verifier)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPECEXEC_SERVE_")}
        env[KEY_ENV] = self.key.decode()
        self.cap = MemoryCap.create(cap) if cap else None  # before the process, which then starts inside it
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=(lambda: self.cap.add(os.getpid())) if self.cap else None)
        self._stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self._wait_ready(startup_timeout_s)

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self._stderr.append(line)
            del self._stderr[:-50]

    def _wait_ready(self, timeout_s: float) -> None:
        timer = threading.Timer(timeout_s, self.proc.kill)
        timer.start()
        try:
            for line in self.proc.stdout:
                if line.startswith(READY_LINE):
                    return
        finally:
            timer.cancel()
        self.proc.wait()
        tail = "".join(self._stderr[-8:]).strip()
        self.close()
        raise VerifierStartError(f"the verifier process exited (code {self.proc.returncode}) before listening:\n{tail}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.cap:
            self.cap.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- choosing the pipeline ----------------------------------------------------------------------

def verifier_args(budget_auto: bool, simulate_bus_gbps: float | None, placement: PlacementOptions) -> tuple[str, ...]:
    """`specexec serve` options for a verifier started here."""
    args = ("--budget", "auto") if budget_auto else ()
    if simulate_bus_gbps:
        args += ("--simulate-bus-gbps", str(simulate_bus_gbps))
    return args + placement.args()


def drafter_threads(link: LinkOptions, overlap: bool) -> int | None:
    """Torch threads for this process: the user's choice, else one each when a verifier started
    here overlaps with us on the same cores."""
    return link.threads or (1 if overlap and not link.in_process and not link.connect else None)


@contextlib.contextmanager
def open_pipeline(models: ModelOptions, link: LinkOptions, placement: PlacementOptions = PlacementOptions(),
                  needs_draft: bool = True, budget_auto: bool = False,
                  simulate_bus_gbps: float | None = None, cap: CapOptions | None = None) -> Iterator:
    """The pipeline `generate`, `chat`, `bench` and the API run on: a verifier at --connect,
    the target in this process (--in-process), or (default) a verifier process started here
    over ipc and stopped afterwards, inside the memory cgroup `cap` if one is given. Raises
    PipelineError naming what is wrong."""
    if link.connect and not placement.is_default:
        raise PipelineError("placement options (--device, --max-memory, --offload...) belong to the verifier: "
                            "pass them to `specexec serve`, not to a drafter using --connect")
    if cap and (link.connect or link.in_process):
        raise PipelineError("a memory cap applies to a verifier started here: cap a `specexec serve` with "
                            "your own tools, or drop --connect/--in-process")
    overlap = resolve_overlap(link, placement)
    threads = drafter_threads(link, overlap)
    if threads:
        torch.set_num_threads(threads)
    try:
        draft_path = model_store.resolve(models.draft, model_store.DRAFT) if needs_draft else None
        if link.in_process:
            from specexec.launch.pipeline import LocalPipeline  # the one place both sides join
            target_path = model_store.resolve(models.target, model_store.TARGET)
            yield LocalPipeline(target_path, draft_path, models, placement, simulate_bus_gbps)
        elif link.connect:
            tokenizer_path = draft_path or model_store.resolve(models.draft, model_store.DRAFT)
            yield RemotePipeline(link.connect, draft_path, tokenizer_path, models.dtype, read_key(link.key_file),
                                 link.curve_dir, link.timeout_s, models.draft_dtype)
        else:
            target_path = model_store.resolve(models.target, model_store.TARGET)
            with LocalVerifier(target_path, models.dtype, threads,
                               verifier_args(budget_auto, simulate_bus_gbps, placement), cap=cap) as verifier:
                yield RemotePipeline(verifier.address, draft_path, draft_path or target_path, models.dtype,
                                     verifier.key, None, link.timeout_s, models.draft_dtype, verifier.cap)
    except (model_store.ModelStoreError, ValueError, LinkError, CapUnavailable) as err:
        raise PipelineError(str(err)) from err
