"""The drafter process's side of the two-process pipeline, and a verifier it can start itself."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from typing import Callable

from specexec.drafter.remote import RemoteVerifier
from specexec.drafter.session import GenerationResult
from specexec.drafter.budget_tuner import BudgetTuners
from specexec.drafter.session import RunOptions
from specexec.launch.pipeline import draft_curve, draft_session, encode_prompt, load_draft, load_tokenizer, report
from specexec.launch.serve import READY_LINE
from specexec.protocol.fingerprint import tokenizer_fingerprint
from specexec.protocol.messages import Hello
from specexec.protocol.sampling import SamplingParams

KEY_ENV = "SPECEXEC_HMAC_KEY"


class VerifierStartError(RuntimeError):
    """The verifier process could not be started; the message carries its last words."""


class RemotePipeline:
    """Drafts here, verifies at `address`; the draft model stays loaded between prompts."""

    def __init__(self, address: str, draft_path: str | None, tokenizer_path: str, dtype: str = "auto",
                 key: bytes | None = None, curve_dir: str | None = None, timeout_s: float = 60.0,
                 draft_dtype: str = "auto"):
        self.address, self.key, self.curve_dir, self.timeout_s = address, key, curve_dir, timeout_s
        self.draft_path = draft_path
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.draft = None
        if draft_path is not None:
            self.draft = load_draft(draft_path, dtype, draft_dtype)
        probe = self._link(Hello(uuid.uuid4().hex, self.fingerprint, SamplingParams(), "specexec"))
        try:
            self.welcome = probe.open()
        finally:
            probe.close()
        if self.draft is not None and self.draft.vocab_size != self.welcome.vocab_size:
            raise ValueError(f"draft vocabulary ({self.draft.vocab_size}) differs from the target's "
                             f"({self.welcome.vocab_size}): not a usable pair")
        self.stop_ids = frozenset(self.welcome.stop_ids)
        self.tuners = BudgetTuners(self._target_curve, lambda: draft_curve(self.draft, self.draft_path), report)

    def _link(self, hello: Hello) -> RemoteVerifier:
        return RemoteVerifier(self.address, hello, self.key, self.curve_dir, self.timeout_s)

    def _target_curve(self) -> dict[int, float]:
        if not self.welcome.forward_curve:
            raise ValueError(f"the verifier at {self.address} has no forward-cost profile for --budget auto: "
                             "start it with `specexec serve --budget auto`")
        return dict(self.welcome.forward_curve)

    def encode(self, text: str, chat: bool | None) -> list[int]:
        return encode_prompt(self.tokenizer, text, chat, self.welcome.chat_template)

    def generate(self, prompt_ids: list[int], options: RunOptions,
                 on_tokens: Callable[[list[int]], None] | None = None, context: str | None = None
                 ) -> GenerationResult:
        """One continuation; `context` lets `--budget auto` keep its choice across related prompts."""
        session_id = uuid.uuid4().hex
        link = self._link(Hello(session_id, self.fingerprint, options.sampling, options.tree.rule))
        try:
            link.open()
            drafter = draft_session(link, self.draft, self.tuners, options, context,
                                    self.welcome.max_context, session_id)
            return drafter.generate(prompt_ids, on_tokens)
        finally:
            link.close()


class LocalVerifier:
    """`specexec serve` as a child process on a private ipc socket with a one-time HMAC key."""

    def __init__(self, target_path: str, dtype: str = "auto", threads: int | None = None,
                 extra_args: tuple[str, ...] = (), startup_timeout_s: float = 600.0):
        self.dir = tempfile.mkdtemp(prefix="specexec-")
        os.chmod(self.dir, 0o700)
        self.key = secrets.token_hex(32).encode()
        self.address = f"ipc://{self.dir}/verifier.sock"
        cmd = [sys.executable, "-m", "specexec.launch.cli", "serve", "--target", target_path, "--bind", self.address,
               "--dtype", dtype, "--exit-with-parent", *extra_args]
        if threads:
            cmd += ["--threads", str(threads)]
        env = dict(os.environ, **{KEY_ENV: self.key.decode()})
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
