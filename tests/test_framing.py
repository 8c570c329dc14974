"""Replays: refused across verifier restarts, after any number of other messages, and when old."""

import pytest

from specexec.protocol.codec import ProtocolError
from specexec.protocol.framing import Signer, from_frames, to_frames
from specexec.protocol.messages import Close, ErrorReply, Hello, Verdict, VerifyRequest, Welcome
from specexec.protocol.sampling import SamplingParams
from specexec.protocol.tree import DraftTree
from figures import record
from served import FINGERPRINT, KEY, RawClient, ServedVerifier
from tiny_models import tiny_lm

PROMPT = [3, 14, 15, 9, 2, 6]


def test_a_replay_is_refused_after_70000_other_messages():
    sender, receiver = Signer(KEY), Signer(KEY)
    first = to_frames(sender, Close("s"))
    from_frames(receiver, first)
    for i in range(70_000):
        from_frames(receiver, to_frames(sender, Close(str(i))))
    with pytest.raises(ProtocolError, match="replayed message"):
        from_frames(receiver, first)
    record("replay", refused_after_other_messages=70_000)


def test_a_very_old_message_is_refused_naming_its_age():
    now = [1_000_000.0]
    old = to_frames(Signer(KEY, clock=lambda: now[0] - 400), Close("s"))
    with pytest.raises(ProtocolError, match="signed 400 s ago, outside the 300 s window") as err:
        from_frames(Signer(KEY, clock=lambda: now[0]), old)
    assert err.value.code == "bad_signature"
    assert from_frames(Signer(KEY, clock=lambda: now[0]), to_frames(Signer(KEY, clock=lambda: now[0] - 200),
                                                                    Close("s"))) == Close("s")


def test_seen_signatures_are_forgotten_by_time_not_kept_forever():
    now = [0.0]
    receiver = Signer(KEY, max_age_s=10, clock=lambda: now[0])
    for i in range(100):
        from_frames(receiver, to_frames(Signer(KEY, clock=lambda: now[0]), Close(str(i))))
    now[0] = 25.0
    from_frames(receiver, to_frames(Signer(KEY, clock=lambda: now[0]), Close("late")))
    assert receiver.remembered == 1


def test_messages_recorded_before_a_verifier_restart_are_refused():
    model = tiny_lm("qwen2")
    hello = Hello("s1", FINGERPRINT, SamplingParams(), "specexec")
    verify = VerifyRequest("s1", 0, PROMPT, DraftTree.build([5, 6], [-1, 0]), 4)
    with ServedVerifier(model) as first:
        victim = RawClient(first.address)
        assert isinstance(victim.ask(hello), Welcome)
        recorded = [to_frames(victim.signer, hello), to_frames(victim.signer, verify)]
        victim.send_frames(recorded[1])
        assert isinstance(victim.recv(), Verdict)
        victim.close()
    with ServedVerifier(model) as restarted:  # same key, new process state
        attacker = RawClient(restarted.address)
        replies = []
        for frames in recorded:
            attacker.send_frames(frames)
            replies.append(attacker.recv())
        assert not restarted.service.sessions
        attacker.close()
    assert [r.code for r in replies] == ["stale_epoch", "unknown_session"], replies
    assert "signed for another start of this verifier" in replies[0].message
    assert "earlier start of this verifier" in replies[1].message
    record("replay", after_restart=[f"{r.code}: {r.message}" for r in replies])
