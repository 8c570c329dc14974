"""The verifier's hard cap on connections (`serve --max-connections`): more raw TCP connections than
the cap leave the process's descriptors bounded, its CPU idle, and a drafter already connected at work."""

import os
import socket
import threading
import time

import pytest

from figures import record
from processes import free_port, start_serve, stop
from specexec.verifier.connection_cap import MAX_CONNECTIONS
from specexec.verifier.server import ServerConfig
from test_connections import cpu_seconds, open_idle
from test_faults import PROMPT, N, pair, session_against  # noqa: F401  (the module's tiny pair fixture)
from tiny_models import greedy_reference

CAP = 16
FLOOD = 400
SETTLE_S = 2.0  # from the flood's start: a burst of accepts is shut down within this
SLACK_FDS = 8  # descriptors the verifier may open besides connections while the test runs


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def closed_by_peer(s):
    """True once the other end closed this socket (EOF or reset); reads whatever greeting it sent."""
    try:
        while True:
            if not s.recv(4096):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def generate(session, result):
    t = time.monotonic()
    result["out"] = session.generate(list(PROMPT))
    result["s"] = time.monotonic() - t


def test_the_default_cap_has_one_home():
    assert ServerConfig().max_connections == MAX_CONNECTIONS


def test_connections_over_the_cap_are_closed_and_a_connected_drafter_keeps_working(pair):
    paths, target, draft, key = pair
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    proc = start_serve(paths["target"], address, key, "--max-connections", str(CAP))
    socks, result, fds, sampling = [], {}, [], threading.Event()

    def sample():  # (seconds since the flood began, descriptors open)
        while not sampling.is_set():
            fds.append((time.monotonic() - t_flood, open_fds(proc.pid)))
            time.sleep(0.05)

    try:
        link, session = session_against(address, draft, timeout_s=30)
        link.open()  # connected (and its session open) before the flood
        before = open_fds(proc.pid)
        t_flood = time.monotonic()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        socks = open_idle(port, FLOOD)  # half of them send 10 bytes of a greeting after 1 s
        time.sleep(SETTLE_S - (time.monotonic() - t_flood))
        refused = sum(closed_by_peer(s) for s in socks)  # before the 5 s handshake timeout could close any
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        thread = threading.Thread(target=generate, args=(session, result), daemon=True)
        thread.start()
        time.sleep(3.0)
        cpu = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
        sampling.set()
        thread.join(60)
        link.close(wait_s=0)
        for s in socks:
            s.close()
        link2, later = session_against(address, draft, timeout_s=30)  # the slots are free again
        link2.open()
        again = later.generate(list(PROMPT))
        link2.close(wait_s=0)
    finally:
        for s in socks:
            s.close()
        stop(proc)
    settled = max(n for t, n in fds if t >= SETTLE_S)
    assert settled <= before + CAP + SLACK_FDS, (before, fds)
    assert refused >= FLOOD // 2, refused  # the rest: queued in the kernel's accept backlog, or retrying SYNs
    assert cpu < 0.5, f"verifier used {cpu:.0%} of a core beside the refused connections"
    assert "out" in result, "the connected drafter's generation did not finish within 60 s"
    ref = greedy_reference(target, list(PROMPT), N)
    assert result["out"].error is None and result["out"].token_ids == ref
    assert result["s"] < 30, result["s"]
    assert again.error is None and again.token_ids == ref
    record("connection_cap", cap=CAP, raw_connections=FLOOD, refused_at_once=refused,
           verifier_fds_before=before, verifier_fds_settled=settled,
           verifier_fds_transient_peak=max(n for _, n in fds), verifier_cpu=round(cpu, 3),
           generation_s=round(result["s"], 2), generated_tokens=len(ref))


@pytest.mark.parametrize("curve", [False, True])
def test_a_drafter_arriving_while_the_cap_is_full_is_told_so(tmp_path, curve):
    """Not a wrong-key or one-side-CURVE verdict alone: the message names the connection cap, and the
    drafter already connected keeps its session."""
    from served import FINGERPRINT, KEY, RawClient, ServedVerifier
    from specexec.drafter.remote import HandshakeRefused, RemoteVerifier, VerifierRejected, VerifierUnreachable
    from specexec.protocol.messages import Hello, Welcome
    from specexec.protocol.sampling import SamplingParams
    from specexec.protocol.security import generate_keys
    from tiny_models import tiny_lm
    keys = generate_keys(tmp_path / "keys") if curve else None
    with ServedVerifier(tiny_lm("qwen2"), max_connections=1, curve_dir=keys and str(keys)) as served:
        first = RawClient(served.address, curve_dir=keys)
        assert isinstance(first.ask(Hello("first", FINGERPRINT, SamplingParams(), "specexec")), Welcome)
        late = RemoteVerifier(served.address, Hello("late", FINGERPRINT, SamplingParams(), "specexec"), KEY,
                              curve_dir=keys and str(keys), timeout_s=9)
        t = time.monotonic()
        # without CURVE a connection over the cap may complete the NULL handshake and send before it is shut
        # down: the verifier then answers over_capacity instead of serving it
        with pytest.raises((HandshakeRefused, VerifierUnreachable, VerifierRejected),
                           match="maximum of connections.*serve --max-connections"):
            late.open()
        took = time.monotonic() - t
        late.close(wait_s=0)
        assert isinstance(first.ask(Hello("first", FINGERPRINT, SamplingParams(), "specexec")), Welcome)
        assert served.server.cap.stats.refused >= 1 and set(served.service.sessions) == {"first"}
        first.close()
    assert took < 12, took


def test_a_drafter_turned_away_by_idle_peers_gets_in_when_their_handshake_time_is_up():
    """Idle TCP peers fill the cap; a drafter arriving then keeps trying and is served once the verifier's
    handshake timeout closes them (not refused as a wrong key after 3 quick tries)."""
    from served import FINGERPRINT, KEY, ServedVerifier
    from specexec.drafter.remote import RemoteVerifier
    from specexec.protocol.messages import Hello
    from specexec.protocol.sampling import SamplingParams
    from specexec.protocol.security import HANDSHAKE_MS
    from tiny_models import tiny_lm
    with ServedVerifier(tiny_lm("qwen2"), max_connections=4) as served:
        port = int(served.address.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        time.sleep(0.5)
        assert served.server.cap.stats.open == 4
        link = RemoteVerifier(served.address, Hello("late", FINGERPRINT, SamplingParams(), "specexec"), KEY,
                              timeout_s=20)
        t = time.monotonic()
        link.open()
        took = time.monotonic() - t
        link.close(wait_s=0)
        for s in idle:
            s.close()
    assert took < HANDSHAKE_MS / 1000 + 3, took
    record("connection_cap", drafter_waited_for_idle_peers_s=round(took, 2))
