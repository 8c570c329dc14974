"""Start `specexec serve` / `specexec generate` as real processes for fault tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from specexec.launch.options import READY_LINE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(target_path: str, address: str, key_file: str, *extra: str, prefix=(), preexec_fn=None) -> subprocess.Popen:
    cmd = list(prefix) + [sys.executable, "-m", "specexec.launch.cli", "serve", "--target", target_path, "--bind", address,
                          "--key-file", key_file, "--dtype", "float32", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                            preexec_fn=preexec_fn)
    line = proc.stdout.readline()
    if not line.startswith(READY_LINE):
        proc.kill()
        raise RuntimeError(f"verifier did not start: {line!r}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
