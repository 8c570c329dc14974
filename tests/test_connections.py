"""Idle and half-open connections: 1500 peers that connect and send nothing (or half a greeting)
against a verifier started with the common soft limit of 1024 descriptors."""

import os
import resource
import socket
import threading
import time

import pytest

from figures import record
from processes import free_port, start_serve, stop
from test_faults import pair, session_against  # noqa: F401  (the module's tiny pair fixture)

IDLE = int(os.environ.get("SPECEXEC_IDLE_CONNECTIONS", "1500"))
GREETING = b"\xff" + b"\x00" * 8 + b"\x7f"  # the first 10 bytes of a ZMTP greeting, then silence


def soft_limit_1024():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_idle(port, n):
    socks = []
    for i in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    time.sleep(1.0)
    for s in socks[::2]:
        try:
            s.send(GREETING)  # half of them start a greeting and stop
        except OSError:
            pass
    return socks


def test_idle_connections_neither_pin_the_cpu_nor_stall_a_generation(pair):
    paths, target, draft, key = pair
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < IDLE + 1100:
        pytest.skip(f"hard descriptor limit {hard} is too low to open {IDLE} connections here")
    if soft < IDLE + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, IDLE + 1100), hard))
    port = free_port()
    proc = start_serve(paths["target"], f"tcp://127.0.0.1:{port}", key, preexec_fn=soft_limit_1024)
    socks = []
    try:
        with open(f"/proc/{proc.pid}/limits") as fh:
            server_soft = int(next(line for line in fh if line.startswith("Max open files")).split()[3])
        socks = open_idle(port, IDLE)
        time.sleep(1.0)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(3.0)
        cpu = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
        link, session = session_against(f"tcp://127.0.0.1:{port}", draft, timeout_s=30)
        result = {}

        def generate():
            t = time.monotonic()
            link.open()
            result["out"] = session.generate([3, 14, 15, 9, 2, 6])
            result["s"] = time.monotonic() - t

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        thread.join(90)
        link.close(wait_s=0)
    finally:
        for s in socks:
            s.close()
        stop(proc)
    assert server_soft > 1024, "the verifier did not raise its soft descriptor limit"
    assert "out" in result, "the generation did not finish within 90 s beside the idle connections"
    assert result["out"].error is None
    assert cpu < 0.5, f"verifier used {cpu:.0%} of a core while the connections sat idle"
    assert result["s"] < 30, result["s"]
    record("connections", idle_connections=IDLE, verifier_soft_fd_limit=server_soft,
           verifier_cpu_while_idle=round(cpu, 3), generation_s=round(result["s"], 2),
           generated_tokens=len(result["out"].token_ids))
