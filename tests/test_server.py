import time

import msgpack
import numpy as np
import pytest

from specexec.protocol.codec import encode
from specexec.protocol.framing import TAG
from specexec.protocol.messages import Close, ErrorReply, Hello, Verdict, VerifyRequest, Welcome
from specexec.protocol.sampling import SamplingParams
from specexec.protocol.tree import DraftTree
from served import FINGERPRINT, RawClient, ServedVerifier, remote_run
from tiny_models import greedy_reference, perturbed, tiny_lm

PROMPT = [3, 14, 15, 9, 2, 6]


@pytest.fixture(scope="module")
def model():
    return tiny_lm("qwen2")


@pytest.fixture
def served(model):
    with ServedVerifier(model, max_sessions=4, idle_timeout_s=60) as s:
        yield s


@pytest.fixture
def client(served):
    c = RawClient(served.address)
    yield c
    c.close()


def hello(session="s1", rule="specexec"):
    return Hello(session, FINGERPRINT, SamplingParams(), rule)


def verify(session="s1", round_=0, append=PROMPT, tokens=(5, 6), parents=(-1, 0), max_emit=4):
    return VerifyRequest(session, round_, list(append), DraftTree.build(list(tokens), list(parents)), max_emit)


def test_handshake_and_a_round(client, model):
    welcome = client.ask(hello())
    assert isinstance(welcome, Welcome) and welcome.vocab_size == 96 and welcome.max_tree_nodes > 0
    verdict = client.ask(verify())
    assert isinstance(verdict, Verdict) and verdict.round == 0
    assert verdict.bonus == greedy_reference(model, PROMPT + [5, 6][:len(verdict.accepted)], 1)[0]


def test_a_resent_round_is_answered_again_not_applied_twice(client):
    client.ask(hello())
    first = client.ask(verify())
    again = client.ask(verify())
    assert (again.round, again.accepted, again.bonus) == (first.round, first.accepted, first.bonus)
    stale = client.ask(verify(round_=0, append=[1]))
    assert (stale.round, stale.accepted) == (first.round, first.accepted)  # same round number: the cached reply
    nxt = client.ask(verify(round_=1, append=[first.bonus], tokens=(), parents=()))
    assert isinstance(nxt, Verdict) and nxt.round == 1


@pytest.mark.parametrize("case, code, text", [
    ("garbage", "bad_message", "undecodable message"),
    ("two_frames", "bad_message", "expected 3 frames"),
    ("bad_tag", "bad_version", "unknown frame tag"),
    ("wrong_version", "bad_version", "protocol version 7 is not supported"),
    ("wrong_key", "bad_signature", "HMAC signature does not match"),
    ("unsigned", "bad_signature", "not signed"),
    ("not_topological", "bad_tree", "node 1: parent 1 is not an earlier node"),
    ("out_of_range", "bad_tree", "node 0: token id 96 out of range"),
    ("append_out_of_range", "bad_tree", "append holds token id -5"),
    ("duplicate_siblings", "bad_tree", "duplicates a sibling"),
    ("oversized", None, "dropped by libzmq at its size header: no reply"),
    ("too_many_nodes", "bad_message", "exceed the limit of 4096"),
    ("unknown_session", "unknown_session", "no state for this session"),
    ("fingerprint", "fingerprint_mismatch", "tokenizer differs"),
    ("wrong_direction", "bad_message", "does not accept Welcome"),
])
def test_bad_input_gets_a_named_error_and_the_server_keeps_serving(client, served, case, code, text):
    client.ask(hello())
    signer = client.signer
    if case == "garbage":
        client.send_frames([TAG, signer.sign(b"\xc1junk"), b"\xc1junk"])
    elif case == "two_frames":
        client.send_frames([TAG, b"x"])
    elif case == "bad_tag":
        client.send_frames([b"SPX/0"] + [signer.sign(encode(Close("s1"))), encode(Close("s1"))])
    elif case == "wrong_version":
        body = msgpack.unpackb(encode(Close("s1")), raw=False)
        body["v"] = 7
        payload = msgpack.packb(body, use_bin_type=True)
        client.send_frames([TAG, signer.sign(payload), payload])
    elif case == "wrong_key":
        payload = encode(verify())
        from specexec.protocol.framing import Signer
        client.send_frames([TAG, Signer(b"x" * 32, epoch=signer.epoch).sign(payload), payload])
    elif case == "unsigned":
        client.send_frames([TAG, b"", encode(verify())])
    elif case == "not_topological":
        client.send(verify(tokens=(5, 6), parents=(-1, 1)))
    elif case == "out_of_range":
        client.send(verify(tokens=(96,), parents=(-1,)))
    elif case == "append_out_of_range":
        client.send(verify(append=[1, -5]))
    elif case == "duplicate_siblings":
        client.send(verify(tokens=(5, 5), parents=(-1, -1)))
    elif case == "oversized":
        payload = encode(verify(append=[1] * (3 << 20)))  # 12 MB of tokens, above the 8 MB message limit
        client.send_frames([TAG, signer.sign(payload), payload])
    elif case == "too_many_nodes":
        client.send(verify(tokens=range(5000), parents=[-1] * 5000))
    elif case == "unknown_session":
        client.send(verify(session="nobody"))
    elif case == "fingerprint":
        client.send(Hello("s2", "other-vocabulary", SamplingParams(), "specexec"))
    elif case == "wrong_direction":
        client.send(Welcome("s1", 1, 1, 1, 1))
    if code is None:
        assert not client.sock.poll(2000)  # the connection was closed before the frame was read
    else:
        reply = client.recv()
        assert isinstance(reply, ErrorReply) and reply.code == code and text in reply.message, reply
        assert served.service.stats.errors.get(code, 0) >= 1
    # the same connection and session still work
    assert isinstance(client.ask(verify()), Verdict)


def test_session_cap_and_idle_eviction(model):
    clock = [0.0]
    with ServedVerifier(model, max_sessions=2, idle_timeout_s=30) as served:
        served.service.clock = lambda: clock[0]
        c = RawClient(served.address)
        assert isinstance(c.ask(hello("a")), Welcome)
        assert isinstance(c.ask(hello("b")), Welcome)
        full = c.ask(hello("c"))
        assert isinstance(full, ErrorReply) and full.code == "over_capacity"
        clock[0] = 31.0  # a and b idle past the timeout: a new session gets in
        assert isinstance(c.ask(hello("c")), Welcome)
        assert set(served.service.sessions) == {"c"}
        c.close()


def test_cached_token_cap_evicts_least_recently_used(model):
    with ServedVerifier(model, max_cached_tokens=18) as served:
        c = RawClient(served.address)
        c.ask(hello("a"))
        c.ask(verify("a", append=PROMPT))
        c.ask(hello("b"))
        c.ask(verify("b", append=PROMPT * 2))  # 12 + 2 nodes on top of a's 6-8 tokens: "a" must go
        assert set(served.service.sessions) == {"b"}
        lost = c.ask(verify("a", round_=1, append=[1]))
        assert isinstance(lost, ErrorReply) and lost.code == "unknown_session"
        c.close()


def test_remote_generation_equals_target_greedy(served, model):
    draft = perturbed(model, 0.05)
    ref = greedy_reference(model, PROMPT, 30)
    for overlap in (False, True):
        out = remote_run(served.address, draft, PROMPT, 30, budget=16, overlap=overlap)
        assert out.token_ids == ref and out.error is None
        assert out.stats.summary()["bytes_sent"] > 0
    assert not served.service.sessions  # closed sessions free their caches


def test_close_frees_the_session(client, served):
    client.ask(hello("gone"))
    assert "gone" in served.service.sessions
    client.ask(Close("gone"))
    assert "gone" not in served.service.sessions


def test_a_session_is_touched_only_by_its_owner(model):
    """Another key holder who knows a session id can neither read its verdicts nor change or end it."""
    with ServedVerifier(model) as served:
        owner, intruder = RawClient(served.address), RawClient(served.address)
        assert isinstance(owner.ask(hello("mine")), Welcome)
        first = owner.ask(verify("mine"))
        second = owner.ask(verify("mine", round_=1, append=[first.bonus], tokens=(), parents=()))
        assert isinstance(second, Verdict)
        cached = served.service.sessions["mine"].session.processed
        assert isinstance(intruder.ask(hello("theirs")), Welcome)  # a key holder with a session of its own
        tries = [intruder.ask(verify("mine", round_=1, append=[first.bonus], tokens=(), parents=())),  # cached
                 intruder.ask(verify("mine", round_=0)),  # stale: would tell the last round
                 intruder.ask(verify("mine", round_=2, append=[second.bonus])),  # a new round on its cache
                 intruder.ask(Close("mine")),
                 intruder.ask(hello("mine"))]  # re-open: would reset the owner's cache
        assert all(isinstance(r, ErrorReply) and r.code == "not_owner" for r in tries), tries
        assert not any("last verified" in r.message for r in tries)
        assert served.service.sessions["mine"].session.processed == cached
        third = owner.ask(verify("mine", round_=2, append=[second.bonus]))
        assert isinstance(third, Verdict) and third.round == 2
        owner.close()
        intruder.close()
    from figures import record
    record("access", other_connection_received=sorted({f"{r.code}: {r.message}" for r in tries}))


def curve_keys_for_two_clients(tmp_path):
    """A verifier key directory authorizing two client keys; returns (verifier/owner dir, other client dir)."""
    import shutil
    from specexec.protocol.security import generate_keys
    mine, other = generate_keys(tmp_path / "mine"), generate_keys(tmp_path / "other")
    shutil.copy(other / "client.key", mine / "authorized" / "other.key")
    shutil.copy(mine / "server.key", other / "server.key")  # the other client trusts this verifier
    return mine, other


def intrude(client, first, second):
    """Everything a key holder could try on the session "mine"; returns the replies."""
    return [client.ask(verify("mine", round_=1, append=[first.bonus], tokens=(), parents=())),  # cached verdict
            client.ask(verify("mine", round_=0)),  # stale: would tell the last round
            client.ask(verify("mine", round_=2, append=[second.bonus])),  # a new round on the owner's cache
            client.ask(Close("mine")),
            client.ask(hello("mine"))]  # re-open: would reset the owner's cache


def test_with_curve_a_session_belongs_to_the_clients_curve_key_too(model, tmp_path):
    """CURVE on, two authorized client keys: the other key cannot touch the session, from its own connection
    nor with the owner's routing identity forged (after the owner dropped its connection)."""
    mine, other = curve_keys_for_two_clients(tmp_path)
    with ServedVerifier(model, curve_dir=str(mine)) as served:
        owner = RawClient(served.address, curve_dir=mine)
        assert isinstance(owner.ask(hello("mine")), Welcome)
        first = owner.ask(verify("mine"))
        second = owner.ask(verify("mine", round_=1, append=[first.bonus], tokens=(), parents=()))
        assert isinstance(second, Verdict) and second.round == 1
        hosted = served.service.sessions["mine"]
        assert hosted.owner.user and hosted.owner.identity == owner.routing_id  # bound to the key and the identity
        cached = hosted.session.processed

        intruder = RawClient(served.address, curve_dir=other)
        assert isinstance(intruder.ask(hello("theirs")), Welcome)  # an authorized key with a session of its own
        assert served.service.sessions["theirs"].owner.user != hosted.owner.user
        tries = intrude(intruder, first, second)
        intruder.close()

        owner.close()  # the owner's connection drops (a reconnect): its routing identity is free to claim
        time.sleep(0.5)
        forger = RawClient(served.address, curve_dir=other, routing_id=owner.routing_id)
        assert isinstance(forger.ask(hello("forger")), Welcome)
        assert served.service.sessions["forger"].owner.identity == owner.routing_id  # the forgery took hold
        forged = intrude(forger, first, second)
        forger.close()

        for r in tries + forged:
            assert isinstance(r, ErrorReply) and r.code == "not_owner", r
            assert "last verified" not in r.message
        assert "belongs to another connection; nothing was done" in forged[0].message
        assert served.service.sessions["mine"] is hosted
        assert (hosted.session.processed, hosted.last_round) == (cached, 1)

        back = RawClient(served.address, curve_dir=mine, routing_id=owner.routing_id)  # the owner reconnects
        assert isinstance(back.ask(hello("mine")), Welcome)  # a repeated Hello from the owner changes nothing
        third = back.ask(verify("mine", round_=2, append=[second.bonus]))
        assert isinstance(third, Verdict) and third.round == 2
        back.close()
    from figures import record
    record("access", other_curve_key_received=sorted({f"{r.code}: {r.message}" for r in tries + forged}))


def test_idle_sessions_that_never_generated_are_evicted_first(model):
    clock = [0.0]
    with ServedVerifier(model, max_sessions=2, idle_timeout_s=600, unused_grace_s=5) as served:
        served.service.clock = lambda: clock[0]
        c = RawClient(served.address)
        assert isinstance(c.ask(hello("working")), Welcome)
        assert isinstance(c.ask(hello("silent")), Welcome)  # opened, never sends a round
        clock[0] = 1.0
        assert isinstance(c.ask(verify("working")), Verdict)
        clock[0] = 3.0
        early = c.ask(hello("new"))
        assert isinstance(early, ErrorReply) and early.code == "over_capacity"  # within the grace: kept
        clock[0] = 6.0
        assert isinstance(c.ask(hello("new")), Welcome)
        assert set(served.service.sessions) == {"working", "new"}
        c.close()


def test_oversized_frames_are_refused_before_they_are_buffered(model):
    """40 unauthenticated 9 MiB frames sent while the verifier is busy: libzmq drops each at its size
    header (ZMQ_MAXMSGSIZE) instead of queueing them whole."""
    import subprocess
    import sys
    from specexec.verifier.request_memory import RequestMemory
    flood = ("import sys, zmq, os, time\n"
             "ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.connect(sys.argv[1])\n"
             "junk = os.urandom(9 << 20)\n"
             "for _ in range(40): s.send_multipart([b'SPX/2', os.urandom(40), junk])\n"
             "time.sleep(4); s.close(0); ctx.term()\n")
    with ServedVerifier(model) as served:
        busy = RawClient(served.address)
        busy.ask(hello("busy"))
        target = served.service.target
        target.simulate_bus_gbps = target.weight_bytes / 6e9  # each forward now takes 6 s: frames queue up
        memory = RequestMemory.start()
        memory.step_begin()
        busy.send(verify("busy"))
        subprocess.run([sys.executable, "-c", flood, served.address], check=True, timeout=120)
        memory.step_end()
        assert isinstance(busy.recv(timeout_ms=30000), Verdict)
        busy.close()
        target.simulate_bus_gbps = None
        c = RawClient(served.address)
        assert isinstance(c.ask(hello("after")), Welcome) and isinstance(c.ask(verify("after")), Verdict)
        c.close()
    grew = memory.peak_mb - memory.before_mb
    assert memory.exact and grew < 64, grew
    from figures import record
    record("fuzz", oversized_flood={"frames": 40, "frame_mib": 9, "server_rss_growth_mib": round(grew, 1)})


def test_a_long_prefill_does_not_stall_other_sessions():
    """One client appends 8k tokens at once; another keeps verifying small rounds meanwhile."""
    import threading
    from test_verifier_session import long_model
    model = long_model()
    long_append = [(7 * i) % 90 + 3 for i in range(8192)]
    with ServedVerifier(model) as served:
        long_client, short_client = RawClient(served.address), RawClient(served.address)
        long_client.ask(hello("long"))
        short_client.ask(hello("short"))
        short_client.ask(verify("short"))  # warm
        done = {}

        def prefill():
            t = time.perf_counter()
            long_client.send(verify("long", append=long_append))
            done["verdict"] = long_client.recv(timeout_ms=300_000)
            done["took"] = time.perf_counter() - t

        thread = threading.Thread(target=prefill)
        thread.start()
        time.sleep(0.2)
        waits, bonus, round_ = [], None, 1
        while thread.is_alive():
            t = time.perf_counter()
            reply = short_client.ask(verify("short", round_=round_, append=[bonus or 5], tokens=(), parents=()))
            assert isinstance(reply, Verdict), reply
            waits.append(time.perf_counter() - t)
            bonus, round_ = reply.bonus, round_ + 1
        thread.join()
        long_client.close()
        short_client.close()
    assert isinstance(done["verdict"], Verdict)
    # without interleaving the first short round waits for the whole prefill
    assert len(waits) >= 3 and max(waits) < done["took"] / 3, (waits, done["took"])
    from figures import record
    record("load", long_prefill={"appended_tokens": 8192, "prefill_s": round(done["took"], 2),
                                 "other_session_rounds_meanwhile": len(waits),
                                 "other_session_worst_round_s": round(max(waits), 3)})
