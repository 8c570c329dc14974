"""Load: eight drafters at once against one verifier; caps on sessions and cached tokens."""

import os
import threading
from collections import Counter

from specexec.drafter.draft_model import DraftModel
from figures import record
from specexec.protocol.messages import ErrorReply, Hello, Welcome
from specexec.protocol.sampling import SamplingParams
from served import FINGERPRINT, RawClient, ServedVerifier, remote_run
from tiny_models import perturbed, tiny_lm
from specexec.verifier.placement import peak_rss_mb

N = 32


def prompts(k):
    return [[(7 * i + j) % 90 + 3 for j in range(5 + i)] for i in range(k)]


def concurrent(served, draft_module, jobs):
    results, errors = {}, []

    def work(i, prompt, params):
        try:
            results[i] = remote_run(served.address, DraftModel(draft_module), prompt, N, budget=8, params=params,
                                    overlap=i % 2 == 0, timeout_s=60)
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i, p, s)) for i, (p, s) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return results


def test_eight_concurrent_sessions_each_equal_their_solo_run():
    model = tiny_lm("llama", seed=11)
    draft = perturbed(model, 0.05)
    jobs = [(p, SamplingParams(temperature=0.0 if i < 4 else 0.8, top_p=0.95, seed=i))
            for i, p in enumerate(prompts(8))]
    with ServedVerifier(model, max_sessions=8) as served:
        solo = {i: remote_run(served.address, DraftModel(draft), p, N, budget=8, params=s).token_ids
                for i, (p, s) in enumerate(jobs)}
        together = concurrent(served, draft, jobs)
        peak = peak_rss_mb()
        held = len(served.service.sessions)
    for i in solo:
        assert together[i].token_ids == solo[i] and together[i].error is None, i
    assert held == 0
    record("load", concurrent_sessions=8, outputs_identical_to_solo=True, test_process_peak_rss_mb=round(peak))


def test_cached_token_cap_evicts_and_drafters_recover_by_resending():
    model = tiny_lm("llama", seed=11)
    draft = perturbed(model, 0.05)
    jobs = [(p, SamplingParams()) for p in prompts(6)]
    cap = 120  # far below 6 sessions x (prompt + 32 tokens + tree): sessions get evicted and come back
    with ServedVerifier(model, max_sessions=8, max_cached_tokens=cap) as served:
        solo = {i: remote_run(served.address, DraftModel(draft), p, N, budget=8).token_ids
                for i, (p, _) in enumerate(jobs)}
        observed = []
        original = served.service._make_room

        def watched(keep, incoming):
            room = original(keep, incoming)
            observed.append(served.service.cached_tokens() + incoming)
            return room

        served.service._make_room = watched
        together = concurrent(served, draft, jobs)
        evicted = served.service.stats.evicted
        unknown = served.service.stats.errors.get("unknown_session", 0)
    for i in solo:
        assert together[i].token_ids == solo[i], (i, together[i].error)
    assert evicted > 0 and unknown > 0  # evictions happened and were recovered from
    assert max(observed) <= cap
    record("load", cached_token_cap=cap, lru_evictions=evicted, recovered_resends=unknown,
           max_cached_tokens_observed=max(observed), outputs_identical_under_eviction=True)


def test_session_cap_is_a_clear_refusal():
    model = tiny_lm("llama", seed=11)
    with ServedVerifier(model, max_sessions=3) as served:
        c = RawClient(served.address)
        replies = [c.ask(Hello(f"s{i}", FINGERPRINT, SamplingParams(), "specexec")) for i in range(4)]
        c.close()
    assert all(isinstance(r, Welcome) for r in replies[:3])
    assert isinstance(replies[3], ErrorReply) and replies[3].code == "over_capacity"
    assert "maximum of 3 sessions" in replies[3].message
    record("load", session_cap=3, over_cap_reply=replies[3].message)


def test_verifier_process_memory_under_eight_sessions(tmp_path):
    from processes import free_port, start_serve, stop
    from specexec.protocol.fingerprint import tokenizer_fingerprint
    from served import KEY
    from tiny_models import save_tiny_pair, tiny_tokenizer
    paths, model = save_tiny_pair(tmp_path)
    key = tmp_path / "hmac.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = start_serve(paths["target"], address, str(key), "--max-sessions", "8")
    draft = perturbed(model, 0.05)
    fingerprint = tokenizer_fingerprint(tiny_tokenizer())
    results, threads = {}, []
    try:
        alone = remote_run(address, DraftModel(draft), prompts(1)[0], N, budget=8, fingerprint=fingerprint)
        for i, p in enumerate(prompts(8)):
            t = threading.Thread(target=lambda i=i, p=p: results.__setitem__(
                i, remote_run(address, DraftModel(draft), p, N, budget=8, fingerprint=fingerprint, timeout_s=60)))
            threads.append(t)
            t.start()
        for t in threads:
            t.join(300)
    finally:
        stop(proc)
    assert len(results) == 8 and all(r.error is None for r in results.values())
    peak_alone = alone.stats.verifier_peak_rss_mb
    peak_loaded = max(r.stats.verifier_peak_rss_mb for r in results.values())
    assert peak_alone > 0 and peak_loaded < peak_alone + 200
    record("load", verifier_process_peak_rss_mb={"one_session": peak_alone, "eight_sessions": peak_loaded})


LOAD_S = float(os.environ.get("SPECEXEC_LOAD_S", "20"))  # the standing run: SPECEXEC_LOAD_S=600
LOAD_IDLE = int(os.environ.get("SPECEXEC_LOAD_IDLE", "1000"))
RSS_BOUND_MB = 256  # growth of the verifier's resident memory over the run, above its warm level
WAIT_BOUND_S = 10.0  # the longest a legitimate round may wait for its verdict


def test_standing_load(tmp_path):
    """8 sessions generating for LOAD_S seconds against one verifier process, beside idle connections
    and a flood of junk frames: every output equals its solo run, memory and waits stay bounded."""
    import socket
    import time
    from frame_fuzzer import KINDS, FrameFuzzer
    from processes import free_port, start_serve, stop
    from specexec.protocol.fingerprint import tokenizer_fingerprint
    from served import KEY
    from tiny_models import save_tiny_pair, tiny_tokenizer
    paths, model = save_tiny_pair(tmp_path)
    key = tmp_path / "hmac.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    proc = start_serve(paths["target"], address, str(key), "--max-sessions", "16")
    draft = perturbed(model, 0.05)
    fingerprint = tokenizer_fingerprint(tiny_tokenizer())
    jobs = [(p, SamplingParams(temperature=0.0 if i < 4 else 0.8, top_p=0.95, seed=i))
            for i, p in enumerate(prompts(8))]
    stop_at, stopping = None, threading.Event()
    counts, mismatches, waits, errors, rss = Counter(), [], [], [], []
    idle = []

    def rss_now():
        with open(f"/proc/{proc.pid}/status") as fh:
            return next(int(l.split()[1]) / 1024 for l in fh if l.startswith("VmRSS"))

    def drafter(i):
        prompt, params = jobs[i]
        while time.monotonic() < stop_at:
            try:
                out = remote_run(address, DraftModel(draft), prompt, N, budget=8, params=params,
                                 fingerprint=fingerprint, timeout_s=60, overlap=i % 2 == 0)
            except Exception as err:  # surfaced below
                errors.append(repr(err))
                return
            counts[i] += 1
            waits.append(max(r.verify_s for r in out.stats.rounds))
            if out.token_ids != solo[i] or out.error:
                mismatches.append((i, out.error))

    def junk_client():
        """A key holder with its own session; the Hello is sent again until answered, since the idle
        connections may fill the verifier's connection cap for its handshake timeout."""
        from served import RawClient
        c = RawClient(address)
        hello = Hello("junk-session", fingerprint, SamplingParams(), "specexec")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            c.send(hello)
            while c.sock.poll(1000):
                if isinstance(c.recv(), Welcome):
                    while c.sock.poll(500):  # answers to earlier copies of the Hello
                        c.recv()
                    return c
        raise AssertionError("the junk sender got no Welcome within 60 s")

    def junk():
        try:
            c = junk_client()
        except Exception as err:  # surfaced below
            errors.append(f"junk sender: {err!r}")
            return
        fuzzer = FrameFuzzer(KEY, "junk-session", vocab=96, seed=7)
        fuzzer.signer.epoch = c.signer.epoch
        kinds = [k for k in KINDS if k != "oversized"]
        while not stopping.is_set():
            c.send_frames(fuzzer.frames(kinds[counts["junk"] % len(kinds)]))
            counts["junk"] += 1
            c.recv(timeout_ms=30000)
        c.close()

    def sample_rss():
        while not stopping.is_set():
            rss.append(rss_now())
            time.sleep(0.5)

    try:
        solo = [remote_run(address, DraftModel(draft), p, N, budget=8, params=s, fingerprint=fingerprint).token_ids
                for p, s in jobs]
        warm = rss_now()
        for _ in range(LOAD_IDLE):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            idle.append(s)
        stop_at = time.monotonic() + LOAD_S
        threads = [threading.Thread(target=drafter, args=(i,)) for i in range(8)]
        helpers = [threading.Thread(target=junk), threading.Thread(target=sample_rss)]
        for t in threads + helpers:
            t.start()
        for t in threads:
            t.join(LOAD_S + 300)
        stopping.set()
        for t in helpers:
            t.join(60)
    finally:
        stopping.set()
        for s in idle:
            s.close()
        stop(proc)
    assert not errors and not mismatches, (errors, mismatches)
    assert all(counts[i] >= 1 for i in range(8)), counts
    assert counts["junk"] > 0, "the junk flood never ran"
    growth = max(rss) - warm
    assert growth < RSS_BOUND_MB, (warm, max(rss))
    assert max(waits) < WAIT_BOUND_S, max(waits)
    figures = dict(seconds=LOAD_S, sessions=8, idle_connections=LOAD_IDLE,
                   generations=sum(counts[i] for i in range(8)), junk_frames=counts["junk"],
                   outputs_identical_to_solo=True, verifier_rss_warm_mb=round(warm, 1),
                   verifier_rss_peak_mb=round(max(rss), 1), verifier_rss_growth_mb=round(growth, 1),
                   longest_round_wait_s=round(max(waits), 3))
    print("standing load:", figures)
    record("standing_load", **figures)
