"""msgpack encoding of the protocol messages, with validation on decode.

Every message is a msgpack map: `t` (type), `v` (protocol version), `n` (8 random bytes, so no
two signed messages are alike) and the message's fields. Token, parent and accepted-node
arrays travel as raw little-endian int32 bytes, draft probabilities as float32 bytes. Decoding
checks every field's type, size and range and raises ProtocolError naming the field.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import msgpack
import numpy as np

from specexec.protocol.messages import (ERROR_CODES, PROTOCOL_VERSION, Close, ErrorReply, Hello, Message, Verdict,
                               VerifyRequest, Welcome)
from specexec.protocol.sampling import SamplingParams
from specexec.protocol.tree import DraftTree

INT32 = np.dtype("<i4")
FLOAT32 = np.dtype("<f4")
DEFAULT_MAX_BYTES = 8 << 20


class ProtocolError(ValueError):
    """A message that cannot be accepted; `code` is one of messages.ERROR_CODES."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_tree_nodes: int = 4096
    max_append: int = 1 << 17
    max_q_support: int = 1024


def _ints(values) -> bytes:
    return np.asarray(values, dtype=INT32).tobytes()


def encode(msg: Message) -> bytes:
    body = {"v": PROTOCOL_VERSION, "n": os.urandom(8)}
    if isinstance(msg, VerifyRequest):
        tree = msg.tree
        body.update(t="verify", session=msg.session, round=msg.round, append=_ints(msg.append),
                    tokens=_ints(tree.tokens), parents=_ints(tree.parents), max_emit=msg.max_emit)
        if tree.q_ids is not None:
            body.update(q_k=int(tree.q_ids.shape[1]), q_ids=_ints(tree.q_ids),
                        q_probs=np.asarray(tree.q_probs, dtype=FLOAT32).tobytes())
    elif isinstance(msg, Verdict):
        body.update(t="verdict", session=msg.session, round=msg.round, accepted=_ints(msg.accepted),
                    bonus=msg.bonus, finished=msg.finished, verify_s=float(msg.verify_s), extra=msg.extra)
    elif isinstance(msg, Hello):
        body.update(t="hello", v=msg.version, session=msg.session, fingerprint=msg.fingerprint,
                    temperature=float(msg.sampling.temperature), top_p=float(msg.sampling.top_p),
                    seed=msg.sampling.seed, top_k=int(msg.sampling.top_k), min_p=float(msg.sampling.min_p),
                    repetition_penalty=float(msg.sampling.repetition_penalty), rule=msg.rule)
    elif isinstance(msg, Welcome):
        body.update(t="welcome", v=msg.version, session=msg.session, vocab_size=msg.vocab_size,
                    max_tree_nodes=msg.max_tree_nodes, max_append=msg.max_append, max_context=msg.max_context,
                    stop_ids=list(msg.stop_ids), model=msg.model, chat_template=msg.chat_template,
                    forward_curve=[[int(n), float(sec)] for n, sec in msg.forward_curve], offloaded=msg.offloaded)
    elif isinstance(msg, Close):
        body.update(t="close", session=msg.session)
    elif isinstance(msg, ErrorReply):
        body.update(t="error", code=msg.code, message=msg.message, session=msg.session, round=msg.round)
    else:
        raise TypeError(f"not a protocol message: {type(msg).__name__}")
    return msgpack.packb(body, use_bin_type=True)


class _Fields:
    """Typed access to a decoded map; every failure names the message type and field."""

    def __init__(self, body: dict, kind: str):
        self.body, self.kind = body, kind

    def _fail(self, name, what):
        raise ProtocolError("bad_message", f"{self.kind}.{name}: {what}")

    def get(self, name, types, default=...):
        if name not in self.body:
            if default is ...:
                self._fail(name, "missing")
            return default
        value = self.body[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            names = "/".join(t.__name__ for t in _as_tuple(types))
            self._fail(name, f"expected {names}, got {type(value).__name__}")
        return value

    def int(self, name, lo=None, hi=None, default=...):
        value = self.get(name, int, default)
        if value is not default and ((lo is not None and value < lo) or (hi is not None and value > hi)):
            self._fail(name, f"{value} is outside [{lo}, {hi}]")
        return value

    def float(self, name, default=...):
        value = self.get(name, (float, int), default)
        if value is not default and not math.isfinite(value):
            self._fail(name, f"{value} is not finite")
        return float(value) if value is not default else value

    def str(self, name, max_len=4096, default=...):
        value = self.get(name, str, default)
        if value is not default and len(value) > max_len:
            self._fail(name, f"longer than {max_len} characters")
        return value

    def array(self, name, dtype, max_items, default=...):
        raw = self.get(name, bytes, default)
        if raw is default:
            return raw
        if len(raw) % dtype.itemsize:
            self._fail(name, f"{len(raw)} bytes is not a whole number of {dtype.itemsize}-byte items")
        if len(raw) // dtype.itemsize > max_items:
            self._fail(name, f"{len(raw) // dtype.itemsize} items exceed the limit of {max_items}")
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


def decode(payload: bytes, limits: Limits = Limits()) -> Message:
    """Parse and validate one payload; raises ProtocolError with the offending field."""
    if len(payload) > limits.max_bytes:
        raise ProtocolError("too_large", f"message of {len(payload)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_array_len=1 << 16, max_map_len=64)
    except Exception as err:  # msgpack raises several unrelated exception types
        raise ProtocolError("bad_message", f"undecodable message: {type(err).__name__}: {err}") from None
    if not isinstance(body, dict):
        raise ProtocolError("bad_message", f"message must be a map, got {type(body).__name__}")
    kind = body.get("t")
    if not isinstance(kind, str) or kind not in _DECODERS:
        raise ProtocolError("bad_message", f"unknown message type {kind!r}")
    fields = _Fields(body, kind)
    version = fields.int("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"protocol version {version} is not supported (this side speaks "
                                           f"{PROTOCOL_VERSION})")
    return _DECODERS[kind](fields, limits)


def _verify(f: _Fields, limits: Limits) -> VerifyRequest:
    tokens = f.array("tokens", INT32, limits.max_tree_nodes)
    parents = f.array("parents", INT32, limits.max_tree_nodes)
    if len(tokens) != len(parents):
        raise ProtocolError("bad_message", f"verify: tokens ({len(tokens)}) and parents ({len(parents)}) "
                                           "differ in length")
    q_ids = q_probs = None
    if "q_ids" in f.body or "q_probs" in f.body or "q_k" in f.body:
        k = f.int("q_k", 1, limits.max_q_support)
        rows = len(tokens) + 1
        q_ids = f.array("q_ids", INT32, rows * k)
        q_probs = f.array("q_probs", FLOAT32, rows * k)
        if len(q_ids) != rows * k or len(q_probs) != rows * k:
            raise ProtocolError("bad_message", f"verify: draft distributions must hold {rows} x {k} entries")
        q_ids, q_probs = q_ids.reshape(rows, k), q_probs.reshape(rows, k)
    append = f.array("append", INT32, limits.max_append)
    if not len(append):
        raise ProtocolError("bad_message", "verify.append: empty (the root token must be sent)")
    return VerifyRequest(f.str("session", 128), f.int("round", 0, 2**62), append.tolist(),
                         DraftTree(tokens, parents, q_ids, q_probs), f.int("max_emit", 1, 2**31))


def _verdict(f: _Fields, limits: Limits) -> Verdict:
    extra = f.get("extra", dict, {})
    return Verdict(f.int("round", 0, 2**62), f.array("accepted", INT32, limits.max_tree_nodes).tolist(),
                   f.int("bonus", 0, 2**31), f.get("finished", bool), f.float("verify_s", 0.0),
                   f.str("session", 128, ""), extra)


def _hello(f: _Fields, limits: Limits) -> Hello:
    try:
        sampling = SamplingParams(f.float("temperature"), f.float("top_p"), f.int("seed", 0, 2**63 - 1),
                                  f.int("top_k", 0, 2**31, 0), f.float("min_p", 0.0),
                                  f.float("repetition_penalty", 1.0))
    except ValueError as err:
        raise ProtocolError("bad_message", f"hello: {err}") from None
    rule = f.str("rule", 32)
    if rule not in ("specexec", "specinfer"):
        raise ProtocolError("bad_message", f"hello.rule: unknown acceptance rule {rule!r}")
    return Hello(f.str("session", 128), f.str("fingerprint", 128), sampling, rule)


def _welcome(f: _Fields, limits: Limits) -> Welcome:
    stop = f.get("stop_ids", list)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in stop):
        raise ProtocolError("bad_message", "welcome.stop_ids: expected a list of ints")
    curve = f.get("forward_curve", list, [])
    if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and isinstance(p[1], (int, float))
               and not isinstance(p[0], bool) and p[0] > 0 and math.isfinite(p[1]) and p[1] >= 0 for p in curve):
        raise ProtocolError("bad_message", "welcome.forward_curve: expected [tokens, seconds] pairs")
    return Welcome(f.str("session", 128), f.int("vocab_size", 1, 2**31), f.int("max_tree_nodes", 0, 2**31),
                   f.int("max_append", 1, 2**31), f.int("max_context", 1, 2**40), tuple(stop),
                   f.str("model", 512, ""), f.str("chat_template", 1 << 20, ""),
                   tuple((int(n), float(sec)) for n, sec in curve), f.get("offloaded", bool, False))


def _close(f: _Fields, limits: Limits) -> Close:
    return Close(f.str("session", 128))


def _error(f: _Fields, limits: Limits) -> ErrorReply:
    code = f.str("code", 64)
    if code not in ERROR_CODES:
        raise ProtocolError("bad_message", f"error.code: unknown code {code!r}")
    return ErrorReply(code, f.str("message", 1 << 16), f.str("session", 128, ""), f.int("round", -1, 2**62, -1))


_DECODERS = {"verify": _verify, "verdict": _verdict, "hello": _hello, "welcome": _welcome, "close": _close,
             "error": _error}
