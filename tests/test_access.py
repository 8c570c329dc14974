"""Access: a peer without the key learns nothing; CURVE leaves nothing readable on the wire."""

import shutil
import subprocess
import time

import numpy as np
import pytest

from figures import record
from processes import free_port
from specexec.protocol.codec import decode
from specexec.protocol.messages import ErrorReply, Hello
from specexec.protocol.sampling import SamplingParams
from specexec.protocol.security import generate_keys
from specexec.protocol.tree import DraftTree
from specexec.protocol.messages import VerifyRequest
from served import FINGERPRINT, RawClient, ServedVerifier, remote_run
from tiny_models import perturbed, tiny_lm

PROMPT = [61, 7, 83, 29, 44, 90, 12, 5]  # distinctive: its int32 bytes are searched for in the capture


def test_a_peer_without_the_key_gets_only_authentication_errors():
    model = tiny_lm("llama", seed=5)
    with ServedVerifier(model) as served:
        intruder = RawClient(served.address, key=b"not-the-key-not-the-key-not-the!")
        received = []
        for msg in (Hello("x", FINGERPRINT, SamplingParams(), "specexec"),
                    VerifyRequest("x", 0, PROMPT, DraftTree.build([1, 2], [-1, 0]), 8)):
            intruder.send(msg)
            assert intruder.sock.poll(5000)
            frames = intruder.sock.recv_multipart()
            received.append(decode(frames[2]))  # read it without checking the signature, as an attacker would
        unsigned = RawClient(served.address, key=None)
        unsigned.send(Hello("y", FINGERPRINT, SamplingParams(), "specexec"))
        assert unsigned.sock.poll(5000)
        received.append(decode(unsigned.sock.recv_multipart()[2]))
        intruder.close()
        unsigned.close()
        assert not served.service.sessions
    assert all(isinstance(r, ErrorReply) and r.code == "bad_signature" for r in received), received
    record("access", unauthenticated_peer_received=[f"{r.code}: {r.message}" for r in received])


def capture(port, action, tmp_path):
    """Run `action` while tcpdump records loopback traffic on `port`; returns the capture's bytes."""
    if not shutil.which("tcpdump"):
        pytest.skip("tcpdump is not installed (Debian package tcpdump): packet capture not run")
    pcap = tmp_path / f"cap{port}.pcap"
    proc = subprocess.Popen(["tcpdump", "-i", "lo", "-U", "--immediate-mode", "-Z", "root", "-w", str(pcap),
                             f"tcp port {port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if "listening" not in line:
        proc.kill()
        pytest.skip(f"tcpdump cannot capture here: {line.strip()}")
    time.sleep(1.0)  # "listening" is printed a moment before the filter is attached
    try:
        action()
        time.sleep(1.0)
    finally:
        proc.terminate()
        proc.wait(10)
    return pcap.read_bytes()


@pytest.mark.parametrize("curve", [True, False])
def test_curve_traffic_shows_no_plaintext(curve, tmp_path):
    model = tiny_lm("llama", seed=5)
    draft = perturbed(model, 0.05)
    keys = generate_keys(tmp_path / "keys")
    port = free_port()
    needle = np.array(PROMPT, dtype="<i4").tobytes()
    with ServedVerifier(model, bind=f"tcp://127.0.0.1:{port}", curve_dir=str(keys) if curve else None) as served:
        def run_once():
            out = remote_run_curve(served.address, draft, keys if curve else None)
            assert out.error is None and len(out.token_ids) == 12
        data = capture(port, run_once, tmp_path)
    visible = {"prompt token ids": needle in data, "field names": b"append" in data or b"parents" in data}
    if curve:
        assert not any(visible.values()), visible
        record("access", curve_capture={"bytes_captured": len(data), "plaintext_found": visible})
    else:  # the control: the same search finds them when CURVE is off
        assert all(visible.values()), (visible, len(data))


def remote_run_curve(address, draft, keys):
    from specexec.drafter.draft_model import DraftModel
    from specexec.drafter.remote import RemoteVerifier
    from specexec.drafter.session import DraftSession
    from specexec.drafter.tree_search import TreeConfig, TreeSearch
    from served import KEY
    config = TreeConfig("specexec", 6)
    link = RemoteVerifier(address, Hello("cap", FINGERPRINT, SamplingParams(), "specexec"), KEY,
                          curve_dir=str(keys) if keys else None, timeout_s=10)
    link.open()
    try:
        return DraftSession(link, config, TreeSearch(DraftModel(draft), config, SamplingParams()), 12,
                            session_id="cap").generate(PROMPT)
    finally:
        link.close()


def test_serve_binds_an_open_address_only_with_insecure(tmp_path):
    import sys
    from specexec.launch.options import READY_LINE
    from processes import ROOT
    from tiny_models import save_tiny_pair
    paths, _ = save_tiny_pair(tmp_path)
    base = [sys.executable, "-m", "specexec.launch.cli", "serve", "--target", paths["target"], "--dtype", "float32"]
    refused = subprocess.run(base + ["--bind", "tcp://0.0.0.0:*"], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 1 and "refusing to bind tcp://0.0.0.0:* without a key" in refused.stderr
    proc = subprocess.Popen(base + ["--bind", "tcp://0.0.0.0:*", "--insecure"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().startswith(READY_LINE)
    finally:
        proc.terminate()
        proc.wait(10)
    record("access", open_bind_without_key=refused.stderr.strip().splitlines()[-1])
