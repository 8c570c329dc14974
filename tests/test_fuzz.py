"""Thousands of malformed messages: the codec refuses them cleanly, the live server answers each
with an error, stays up, stays bounded in memory, and a healthy session beside them is unaffected."""

import threading
import time
from collections import Counter

import msgpack
from hypothesis import given, settings, strategies as st

from figures import record
from frame_fuzzer import KINDS, FrameFuzzer
from specexec.protocol.codec import ProtocolError, decode, encode
from specexec.protocol.framing import Signer, from_frames
from specexec.protocol.messages import ErrorReply, Hello, Verdict
from specexec.protocol.sampling import SamplingParams
from served import FINGERPRINT, KEY, RawClient, ServedVerifier, remote_run
from tiny_models import greedy_reference, perturbed, tiny_lm
from specexec.verifier.placement import rss_mb

PROMPT = [3, 14, 15, 9, 2, 6]


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=400))
def test_random_payloads_only_ever_raise_protocol_errors(payload):
    try:
        decode(payload)
    except ProtocolError:
        pass


@settings(max_examples=1500, deadline=None)
@given(st.integers(0, 10**9), st.data())
def test_mutated_messages_decode_or_raise_protocol_errors(seed, data):
    body = msgpack.unpackb(encode(Hello("s", "f", SamplingParams(), "specexec")), raw=False)
    key = data.draw(st.sampled_from(sorted(body)))
    body[key] = data.draw(st.one_of(st.none(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=20),
                                    st.binary(max_size=20), st.lists(st.integers(-2**63, 2**63 - 1), max_size=3),
                                    st.booleans()))
    try:
        decode(msgpack.packb(body, use_bin_type=True))
    except ProtocolError:
        pass


def test_live_server_survives_a_seeded_flood_of_malformed_frames():
    model = tiny_lm("qwen2", seed=9)
    draft = perturbed(model, 0.05)
    solo = greedy_reference(model, PROMPT, 40)
    per_kind = 200
    outcomes, healthy = Counter(), {}
    with ServedVerifier(model, max_sessions=8) as served:
        attacker = RawClient(served.address)
        assert attacker.ask(Hello("target-session", FINGERPRINT, SamplingParams(), "specexec")).session
        fuzzer = FrameFuzzer(KEY, "target-session", vocab=96, seed=1234)
        fuzzer.signer.epoch = attacker.signer.epoch  # a key holder who learned the epoch from a reply
        rss_before = rss_mb().get("VmRSS", 0)

        def healthy_session():
            healthy["out"] = remote_run(served.address, draft, PROMPT, 40, budget=8, overlap=True)

        thread = threading.Thread(target=healthy_session)
        thread.start()
        start = time.perf_counter()
        sent = 0
        for round_ in range(per_kind):
            for kind in KINDS:
                if kind == "oversized" and round_ % 20:
                    continue  # 10 of these: each is ~9 MB
                attacker.send_frames(fuzzer.frames(kind))
                sent += 1
                if kind == "oversized":  # libzmq drops the connection before buffering: no reply comes
                    dropped = not attacker.sock.poll(1500)
                    outcomes[(kind, "dropped unread" if dropped else "answered")] += 1
                    continue
                reply = attacker.recv(timeout_ms=20000)
                outcomes[(kind, reply.code if isinstance(reply, ErrorReply) else type(reply).__name__)] += 1
        elapsed = time.perf_counter() - start
        thread.join(120)
        rss_after = rss_mb().get("VmRSS", 0)
        history = served.server.signer.remembered
        attacker.close()
        alive = remote_run(served.address, draft, PROMPT, 8, budget=4)
    assert healthy["out"].token_ids == solo and healthy["out"].error is None
    assert alive.token_ids == solo[:8]
    assert sum(outcomes.values()) == sent  # every malformed message got an answer
    accepted = {key: n for key, n in outcomes.items() if key[1] in ("Verdict", "Welcome")}
    assert not accepted, f"malformed frames that were served: {accepted}"
    assert history <= sent + 100
    assert rss_after - rss_before < 256, (rss_before, rss_after)
    by_kind = {}
    for (kind, code), n in sorted(outcomes.items()):
        by_kind.setdefault(kind, {})[code] = n
    record("fuzz", messages=sent, seconds=round(elapsed, 1), outcomes=by_kind,
           rss_growth_mb=round(rss_after - rss_before, 1), healthy_session_identical=True)
