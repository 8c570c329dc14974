"""Faults: a verifier killed and restarted, a drafter killed mid-round, a slow network, a frozen peer."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import zmq

from specexec.drafter.draft_model import DraftModel
from specexec.drafter.remote import RemoteVerifier
from specexec.drafter.session import DraftSession
from specexec.drafter.tree_search import TreeConfig, TreeSearch
from figures import record
from processes import ROOT, free_port, start_serve, stop
from specexec.protocol.fingerprint import tokenizer_fingerprint
from specexec.protocol.messages import Hello
from specexec.protocol.sampling import SamplingParams
from served import KEY, ServedVerifier
from tiny_models import greedy_reference, save_tiny_pair, tiny_tokenizer

PROMPT = [3, 14, 15, 9, 2, 6]
N = 48


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    paths, target = save_tiny_pair(root)
    key = root / "hmac.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    from transformers import AutoModelForCausalLM
    draft = DraftModel(AutoModelForCausalLM.from_pretrained(paths["draft"], dtype="float32"))
    return paths, target, draft, str(key)


def session_against(address, draft, timeout_s=60.0, name=None):
    name = name or uuid.uuid4().hex
    fingerprint = tokenizer_fingerprint(tiny_tokenizer())
    link = RemoteVerifier(address, Hello(name, fingerprint, SamplingParams(), "specexec"), KEY, timeout_s=timeout_s)
    config = TreeConfig("specexec", 8)
    return link, DraftSession(link, config, TreeSearch(draft, config, SamplingParams()), N, session_id=name)


def test_verifier_sigkilled_and_restarted_loses_no_token(pair):
    paths, target, draft, key = pair
    ref = greedy_reference(target, PROMPT, N)
    address = f"tcp://127.0.0.1:{free_port()}"
    state = {"proc": start_serve(paths["target"], address, key), "rounds": 0, "down_s": None}

    def kill_then_restart(tokens):
        state["rounds"] += 1
        if state["rounds"] == 3:
            os.kill(state["proc"].pid, signal.SIGKILL)  # mid-generation, cache and all
            state["proc"].wait()
            t = time.monotonic()
            state["proc"] = start_serve(paths["target"], address, key)
            state["down_s"] = time.monotonic() - t

    link, session = session_against(address, draft)
    try:
        link.open()
        out = session.generate(PROMPT, kill_then_restart)
    finally:
        link.close()
        stop(state["proc"])
    assert out.error is None and link.stats.reconnects >= 1
    assert out.token_ids == ref  # no token lost or duplicated
    record("faults", verifier_sigkill={"survived": True, "tokens_lost": 0, "reconnects": link.stats.reconnects,
                                       "verifier_down_s": round(state["down_s"], 1)})


def test_killed_drafter_session_is_freed_within_the_idle_timeout(pair, tmp_path):
    paths, target, _, key = pair
    idle = 2.0
    with ServedVerifier(target, idle_timeout_s=idle) as served:
        service = served.service
        service.fingerprint = tokenizer_fingerprint(tiny_tokenizer())
        cmd = [sys.executable, "-m", "specexec.launch.cli", "generate", " ".join(f"w{i}" for i in range(10, 60)), "--raw",
               "--connect", served.address, "--key-file", key, "--draft", paths["draft"], "--dtype", "float32",
               "--max-new-tokens", "400", "--budget", "4"]
        drafter = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.monotonic() + 120
        while not any(s.session.processed > 60 for s in list(service.sessions.values())):
            assert time.monotonic() < deadline, "the drafter never got going"
            time.sleep(0.05)
        held_tokens = service.cached_tokens()
        held_bytes = kv_bytes(service)
        drafter.send_signal(signal.SIGKILL)  # mid-round: no Close is ever sent
        drafter.wait()
        killed = time.monotonic()
        while service.sessions:
            assert time.monotonic() - killed < idle + 5, "session not freed"
            time.sleep(0.05)
        freed_after = time.monotonic() - killed
        assert service.cached_tokens() == 0 and kv_bytes(service) == 0
    assert freed_after < idle + 1.5
    record("faults", drafter_sigkill={"idle_timeout_s": idle, "freed_after_s": round(freed_after, 2),
                                      "kv_tokens_before": held_tokens, "kv_bytes_before": held_bytes,
                                      "kv_tokens_after": 0})


def kv_bytes(service) -> int:
    total = 0
    for hosted in service.sessions.values():
        for layer in hosted.session.cache.layers:
            if getattr(layer, "keys", None) is not None:
                total += layer.keys.numel() * layer.keys.element_size() * 2
    return total


def test_frozen_verifier_is_detected_by_heartbeats(pair):
    paths, _, draft, key = pair
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = start_serve(paths["target"], address, key)
    link, _ = session_against(address, draft, timeout_s=2)
    try:
        link.open()
        assert link._connected
        os.kill(proc.pid, signal.SIGSTOP)  # alive to TCP, silent to ZMTP heartbeats
        frozen = time.monotonic()
        detected = None
        while time.monotonic() - frozen < 20:
            events = dict(link.poller.poll(100))
            if link.monitor in events:
                from zmq.utils.monitor import recv_monitor_message
                link._on_monitor_event(recv_monitor_message(link.monitor))
            if not link._connected:
                detected = time.monotonic() - frozen
                break
        os.kill(proc.pid, signal.SIGCONT)
    finally:
        link.close(wait_s=0)
        stop(proc)
    assert detected is not None and detected < 6.0  # 1 s ping interval, 3 s timeout
    record("faults", dead_peer_detection_s=round(detected, 2), heartbeat="ZMTP ping every 1 s, timeout 3 s")


def test_slow_lossy_network_between_namespaces(pair):
    from netns import NetnsUnavailable, TwoBoxes
    paths, target, _, key = pair
    try:
        boxes = TwoBoxes("delay 50ms loss 5%")
    except NetnsUnavailable as err:
        pytest.skip(f"needs network namespaces: {err}")
    try:
        port = free_port()
        verifier = start_serve(paths["target"], f"tcp://{boxes.verifier_ip}:{port}", key,
                               prefix=["ip", "netns", "exec", boxes.verifier])
        relay = None
        address = f"tcp://{boxes.verifier_ip}:{port}"
        how, loss_error = "netem delay 50ms loss 5%", None
        if boxes.netem is None:
            relay = boxes.popen(boxes.drafter, [os.path.join(ROOT, "tests", "delay_proxy.py"), "127.0.0.1", "6588",
                                                boxes.verifier_ip, str(port), "50"], stdout=subprocess.PIPE, text=True)
            assert relay.stdout.readline().strip() == "ready"
            address, how = "tcp://127.0.0.1:6588", "userspace relay, 50 ms each way"
            try:
                boxes.drop_randomly(0.05)
                how += "; 5% of packets dropped on arrival at each box (iptables statistic)"
            except NetnsUnavailable as err:
                loss_error = f"{boxes.netem_error}; {err}"
                how += "; no loss (kernel lacks netem, no iptables)"
        cmd = ["-m", "specexec.launch.cli", "generate", "w10 w11 w12", "--raw", "--json", "--budget", "6",
               "--max-new-tokens", "24", "--dtype", "float32", "--draft", paths["draft"], "--connect", address,
               "--key-file", key]
        drafter = boxes.popen(boxes.drafter, cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        out, err = drafter.communicate(timeout=600)
        assert drafter.returncode == 0, err[-2000:]
        remote = json.loads(out)
        ids = tiny_tokenizer()("w10 w11 w12")["input_ids"]
        ref = greedy_reference(target, ids, 24)
        ref = ref[: ref.index(2) + 1] if 2 in ref else ref
        assert remote["token_ids"] == ref
        dropped = boxes.dropped_packets() if boxes.netem is None and loss_error is None else None
        record("faults", slow_network={"how": how, "identical": True, "wall_s": remote["stats"]["wall_s"],
                                       "packets_dropped": dropped})
        if loss_error:
            import warnings
            warnings.warn(f"loss not emulated: {loss_error}")
    finally:
        for p in (verifier, relay):
            if p:
                stop(p)
        boxes.close()
