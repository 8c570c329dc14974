import socket

import pytest

from specexec.drafter.draft_model import DraftModel
from served import ServedVerifier, remote_run
from tiny_models import greedy_reference, perturbed, tiny_lm
from specexec.protocol.sampling import SamplingParams
from harness import run

PROMPT = [3, 14, 15, 9, 2, 6]
N = 40


@pytest.fixture(scope="module")
def pair():
    model = tiny_lm("llama", seed=2)
    return model, DraftModel(perturbed(model, 0.05))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["specexec", "specinfer", "chain", "autoregressive"])
def test_remote_equals_in_process_with_and_without_overlap(pair, method):
    model, draft = pair
    ref = greedy_reference(model, PROMPT, N)
    with ServedVerifier(model) as served:
        for overlap in (False, True):
            out = remote_run(served.address, draft, PROMPT, N, method=method, budget=8, overlap=overlap)
            assert out.token_ids == ref, (method, overlap)
    assert run(model, draft, PROMPT, N, method=method, budget=8).token_ids == ref


def test_seeded_sampling_is_identical_with_and_without_overlap(pair):
    model, draft = pair
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    with ServedVerifier(model) as served:
        a = remote_run(served.address, draft, PROMPT, N, params=params, overlap=False).token_ids
        b = remote_run(served.address, draft, PROMPT, N, params=params, overlap=True).token_ids
    assert a == b == run(model, None, PROMPT, N, method="autoregressive", params=params).token_ids


def test_overlap_grows_past_the_budget_and_hits(pair):
    model, draft = pair
    with ServedVerifier(model) as served:
        out = remote_run(served.address, draft, PROMPT, N, budget=4, overlap=True)
    assert out.stats.summary()["overlap_hit_rate"] > 0


def test_verifier_restart_loses_nothing(pair):
    model, draft = pair
    ref = greedy_reference(model, PROMPT, N)
    address = f"tcp://127.0.0.1:{free_port()}"
    holder = {"server": ServedVerifier(model, bind=address), "rounds": 0}

    def restart_after_two_rounds(tokens):
        holder["rounds"] += 1
        if holder["rounds"] == 2:
            holder["server"].close()  # the verifier dies with our session's cache
            holder["server"] = ServedVerifier(model, bind=address)

    from served import FINGERPRINT, KEY
    from specexec.drafter.remote import RemoteVerifier
    from specexec.drafter.session import DraftSession
    from specexec.drafter.tree_search import TreeConfig, TreeSearch
    from specexec.protocol.messages import Hello
    config = TreeConfig("specexec", 8)
    link = RemoteVerifier(address, Hello("restart", FINGERPRINT, SamplingParams(), "specexec"), KEY, timeout_s=20)
    link.open()
    try:
        out = DraftSession(link, config, TreeSearch(draft, config, SamplingParams()), N,
                           session_id="restart").generate(PROMPT, restart_after_two_rounds)
    finally:
        link.close()
        holder["server"].close()
    assert out.error is None
    assert out.token_ids == ref  # nothing lost, nothing duplicated
    assert link.stats.reconnects >= 1


def test_unreachable_verifier_keeps_what_was_generated(pair):
    model, draft = pair
    ref = greedy_reference(model, PROMPT, N)
    address = f"tcp://127.0.0.1:{free_port()}"
    served = ServedVerifier(model, bind=address)
    rounds = []

    def stop_verifier(tokens):
        rounds.append(tokens)
        if len(rounds) == 2:
            served.close()

    from served import FINGERPRINT, KEY
    from specexec.drafter.remote import RemoteVerifier
    from specexec.drafter.session import DraftSession
    from specexec.drafter.tree_search import TreeConfig, TreeSearch
    from specexec.protocol.messages import Hello
    config = TreeConfig("specexec", 4)
    link = RemoteVerifier(address, Hello("u", FINGERPRINT, SamplingParams(), "specexec"), KEY, timeout_s=2)
    link.open()
    out = DraftSession(link, config, TreeSearch(draft, config, SamplingParams()), N,
                       session_id="u").generate(PROMPT, stop_verifier)
    link.close(wait_s=0)
    assert out.error and "no connection to the verifier" in out.error
    kept = [t for r in rounds for t in r]
    assert out.token_ids == kept == ref[:len(kept)] and len(kept) > 0


def test_curve_encrypted_link(pair, tmp_path):
    from specexec.drafter.remote import HandshakeRefused, RemoteVerifier
    from specexec.protocol.messages import Hello
    from specexec.protocol.security import generate_keys
    from served import FINGERPRINT, KEY
    model, draft = pair
    keys = generate_keys(tmp_path / "keys")
    ref = greedy_reference(model, PROMPT, 12)
    with ServedVerifier(model, curve_dir=str(keys)) as served:
        from specexec.drafter.session import DraftSession
        from specexec.drafter.tree_search import TreeConfig, TreeSearch
        config = TreeConfig("specexec", 6)
        link = RemoteVerifier(served.address, Hello("c", FINGERPRINT, SamplingParams(), "specexec"), KEY,
                              curve_dir=str(keys), timeout_s=10)
        link.open()
        out = DraftSession(link, config, TreeSearch(draft, config, SamplingParams()), 12, session_id="c").generate(PROMPT)
        link.close()
        assert out.token_ids == ref
        plain = RemoteVerifier(served.address, Hello("p", FINGERPRINT, SamplingParams(), "specexec"), KEY,
                               timeout_s=2)
        with pytest.raises(HandshakeRefused, match="CURVE is on at one side only"):
            plain.open()  # no CURVE handshake: the server never lets it in, and we say why
        plain.close(wait_s=0)


@pytest.mark.parametrize("case, text", [
    ("unauthorized client key", "not in the verifier's authorized/ directory"),
    ("wrong server key", "the server.key here is not this verifier's"),
])
def test_a_refused_curve_handshake_is_reported_as_such(pair, tmp_path, case, text):
    """Not "no connection for 30 s": the drafter says the verifier refused the handshake, and why."""
    import shutil
    import time
    import zmq.auth
    from figures import record
    from specexec.drafter.remote import HandshakeRefused, RemoteVerifier
    from specexec.protocol.messages import Hello
    from specexec.protocol.security import generate_keys
    from served import FINGERPRINT, KEY
    model, _ = pair
    keys = generate_keys(tmp_path / "server-side")
    mine = generate_keys(tmp_path / "client-side")  # a keypair the verifier has never seen
    if case == "wrong server key":
        shutil.copy(keys / "client.key_secret", mine / "client.key_secret")  # authorized client, foreign server.key
    else:
        shutil.copy(keys / "server.key", mine / "server.key")  # the right server, a client key it never authorized
    with ServedVerifier(model, curve_dir=str(keys)) as served:
        link = RemoteVerifier(served.address, Hello("h", FINGERPRINT, SamplingParams(), "specexec"), KEY,
                              curve_dir=str(mine), timeout_s=30)
        t = time.monotonic()
        with pytest.raises(HandshakeRefused, match=text):
            link.open()
        took = time.monotonic() - t
        link.close(wait_s=0)
    assert took < 10, took
    record("access", curve_refused={case: {"seconds": round(took, 2), "message": text}})
