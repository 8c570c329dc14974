import msgpack
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from specexec.protocol.codec import Limits, ProtocolError, decode, encode
from specexec.protocol.framing import TAG, Signer, from_frames, load_key, to_frames
from specexec.protocol.messages import Close, ERROR_CODES, ErrorReply, Hello, Verdict, VerifyRequest, Welcome
from specexec.protocol.sampling import SamplingParams
from specexec.protocol.tree import DraftTree

ids = st.integers(0, 2**31 - 1)
session = st.text(min_size=1, max_size=40)


@st.composite
def trees(draw, with_q=None):
    n = draw(st.integers(0, 40))
    tokens = draw(st.lists(ids, min_size=n, max_size=n))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    if with_q is None:
        with_q = draw(st.booleans())
    if not with_q:
        return DraftTree.build(tokens, parents)
    k = draw(st.integers(1, 6))
    q_ids = np.array(draw(st.lists(ids, min_size=(n + 1) * k, max_size=(n + 1) * k)), dtype=np.int32)
    q_probs = np.array(draw(st.lists(st.floats(0, 1, width=32), min_size=(n + 1) * k, max_size=(n + 1) * k)),
                       dtype=np.float32)
    return DraftTree.build(tokens, parents, q_ids.reshape(n + 1, k), q_probs.reshape(n + 1, k))


sampling = st.builds(SamplingParams, st.floats(0, 5), st.floats(0.01, 1), st.integers(0, 2**63 - 1),
                     st.integers(0, 1000), st.floats(0, 1), st.floats(0.01, 10))
messages = st.one_of(
    st.builds(VerifyRequest, session, st.integers(0, 2**40), st.lists(ids, min_size=1, max_size=50), trees(),
              st.integers(1, 2**31)),
    st.builds(Verdict, st.integers(0, 2**40), st.lists(st.integers(0, 4000), max_size=40), ids, st.booleans(),
              st.floats(0, 100), session,
              st.dictionaries(st.sampled_from(["a", "b"]), st.integers(-2**63, 2**63 - 1) | st.floats(0, 1e9))),
    st.builds(Hello, session, st.text(max_size=64), sampling, st.sampled_from(["specexec", "specinfer"])),
    st.builds(Welcome, session, st.integers(1, 2**31), st.integers(0, 4096), st.integers(1, 2**31),
              st.integers(1, 2**40), st.lists(ids, max_size=4).map(tuple), st.text(max_size=30),
              st.text(max_size=200),
              st.lists(st.tuples(st.integers(1, 4096), st.floats(0, 100)), max_size=6).map(tuple), st.booleans()),
    st.builds(Close, session),
    st.builds(ErrorReply, st.sampled_from(ERROR_CODES), st.text(max_size=100), session, st.integers(-1, 100)),
)


def same(a, b):
    if isinstance(a, VerifyRequest):
        ta, tb = a.tree, b.tree
        return (a.session, a.round, a.append, a.max_emit) == (b.session, b.round, b.append, b.max_emit) \
            and np.array_equal(ta.tokens, tb.tokens) and np.array_equal(ta.parents, tb.parents) \
            and (ta.q_ids is None) == (tb.q_ids is None) \
            and (ta.q_ids is None or (np.array_equal(ta.q_ids, tb.q_ids) and np.array_equal(ta.q_probs, tb.q_probs)))
    return a == b


@settings(max_examples=300, deadline=None)
@given(messages)
def test_every_message_survives_a_round_trip(msg):
    assert same(decode(encode(msg)), msg)


@settings(max_examples=100, deadline=None)
@given(messages)
def test_signed_frames_round_trip_and_replays_are_refused(msg):
    sender, receiver = Signer(b"k" * 32), Signer(b"k" * 32)
    frames = to_frames(sender, msg)
    assert same(from_frames(receiver, frames), msg)
    with pytest.raises(ProtocolError, match="replayed"):
        from_frames(receiver, frames)


def test_arrays_travel_as_int32_bytes():
    tree = DraftTree.build([1, 2, 3], [-1, 0, 0])
    body = msgpack.unpackb(encode(VerifyRequest("s", 0, [7, 8], tree, 5)), raw=False)
    assert body["tokens"] == np.array([1, 2, 3], "<i4").tobytes()
    assert body["parents"] == np.array([-1, 0, 0], "<i4").tobytes()
    assert body["append"] == np.array([7, 8], "<i4").tobytes()


def tampered(**changes):
    body = msgpack.unpackb(encode(VerifyRequest("s", 1, [7], DraftTree.build([1, 2], [-1, 0]), 5)), raw=False)
    body.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del body[k]
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize("payload, code, message", [
    (b"\xc1\xc1garbage", "bad_message", "undecodable message"),
    (msgpack.packb([1, 2, 3]), "bad_message", "message must be a map"),
    (msgpack.packb({"t": "launch", "v": 1}), "bad_message", "unknown message type 'launch'"),
    (tampered(v=99), "bad_version", "protocol version 99 is not supported"),
    (tampered(round=None), "bad_message", "verify.round: missing"),
    (tampered(round="1"), "bad_message", "verify.round: expected int, got str"),
    (tampered(round=True), "bad_message", "verify.round: expected int, got bool"),
    (tampered(round=-4), "bad_message", r"verify.round: -4 is outside"),
    (tampered(tokens=[1, 2]), "bad_message", "verify.tokens: expected bytes"),
    (tampered(tokens=b"\x01\x00\x00"), "bad_message", "verify.tokens: 3 bytes is not a whole number"),
    (tampered(parents=np.array([-1], "<i4").tobytes()), "bad_message", r"tokens \(2\) and parents \(1\) differ"),
    (tampered(append=b""), "bad_message", "verify.append: empty"),
    (tampered(max_emit=0), "bad_message", "verify.max_emit: 0 is outside"),
    (tampered(q_k=2), "bad_message", "verify.q_ids: missing"),
    (tampered(session="x" * 500), "bad_message", "verify.session: longer than 128"),
])
def test_malformed_payloads_are_named(payload, code, message):
    with pytest.raises(ProtocolError, match=message) as err:
        decode(payload)
    assert err.value.code == code


def hello_with(**changes):
    body = msgpack.unpackb(encode(Hello("s", "f", SamplingParams(), "specexec")), raw=False)
    body.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del body[k]
    return msgpack.packb(body, use_bin_type=True)


def test_hello_repetition_penalty_defaults_to_off_and_must_be_positive():
    assert decode(hello_with(repetition_penalty=None)).sampling.repetition_penalty == 1.0
    assert decode(hello_with(repetition_penalty=1.3)).sampling.repetition_penalty == 1.3


@pytest.mark.parametrize("payload, code, message", [
    (hello_with(repetition_penalty=0.0), "bad_message", "repetition_penalty must be a finite number > 0"),
    (hello_with(repetition_penalty=-1.5), "bad_message", "repetition_penalty must be a finite number > 0"),
])
def test_bad_hello_sampling_is_named(payload, code, message):
    with pytest.raises(ProtocolError, match=message) as err:
        decode(payload)
    assert err.value.code == code


def test_limits():
    big = DraftTree.build(list(range(50)), [-1] * 50)
    payload = encode(VerifyRequest("s", 0, [1], big, 1))
    with pytest.raises(ProtocolError, match="50 items exceed the limit of 10") as err:
        decode(payload, Limits(max_tree_nodes=10))
    assert err.value.code == "bad_message"
    with pytest.raises(ProtocolError, match="exceeds the limit of 100") as err:
        decode(payload, Limits(max_bytes=100))
    assert err.value.code == "too_large"


def test_frames_and_signatures():
    good = to_frames(Signer(b"a" * 32), Close("s"))
    with pytest.raises(ProtocolError, match="HMAC signature does not match") as err:
        from_frames(Signer(b"b" * 32), good)
    assert err.value.code == "bad_signature"
    with pytest.raises(ProtocolError, match="not signed"):
        from_frames(Signer(b"a" * 32), to_frames(Signer(None), Close("s")))
    with pytest.raises(ProtocolError, match="expected 3 frames"):
        from_frames(Signer(None), good[:2])
    with pytest.raises(ProtocolError, match="unknown frame tag") as err:
        from_frames(Signer(None), [b"SPX/9", b"", good[2]])
    assert err.value.code == "bad_version"
    assert from_frames(Signer(None), good) == Close("s")  # a keyless peer does not check signatures
    assert good[0] == TAG


def test_key_files(tmp_path):
    (tmp_path / "k").write_text("ab" * 32 + "\n")
    (tmp_path / "k").chmod(0o600)
    assert load_key(tmp_path / "k") == b"ab" * 32
    (tmp_path / "short").write_text("abc")
    (tmp_path / "short").chmod(0o600)
    with pytest.raises(ValueError, match="holds 3 bytes"):
        load_key(tmp_path / "short")
    with pytest.raises(ValueError, match="cannot read key file"):
        load_key(tmp_path / "missing")


def test_welcome_offloaded_is_a_bool_and_absent_means_in_memory():
    body = msgpack.unpackb(encode(Welcome("s", 96, 64, 64, 1024, offloaded=True)), raw=False)
    assert decode(msgpack.packb(body, use_bin_type=True)).offloaded is True
    del body["offloaded"]  # a verifier from before the field
    assert decode(msgpack.packb(body, use_bin_type=True)).offloaded is False
    body["offloaded"] = "yes"
    with pytest.raises(ProtocolError, match="welcome.offloaded: expected bool, got str"):
        decode(msgpack.packb(body, use_bin_type=True))
