"""Frames on the socket: a tag, an HMAC-SHA256 signature, the msgpack payload.

As in Jupyter's wire protocol, each message is signed with a shared key
(`hmac.new(key, payload, sha256)`), checked with `compare_digest`, and a signature seen before
is refused, so a captured message cannot be replayed. Every payload carries 8 random bytes, so
two honest messages never share a signature. Without a key (loopback and ipc use) frames carry
an empty signature and no check is made.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from pathlib import Path

from specexec.protocol.codec import Limits, ProtocolError, decode, encode
from specexec.protocol.messages import Message

TAG = b"SPX/1"


class Signer:
    def __init__(self, key: bytes | None = None, history: int = 1 << 16):
        self.key = key or None
        self._seen: set[bytes] = set()
        self._order: deque[bytes] = deque()
        self._history = history

    def sign(self, payload: bytes) -> bytes:
        if self.key is None:
            return b""
        return hmac.new(self.key, payload, hashlib.sha256).digest()

    def check(self, payload: bytes, signature: bytes) -> None:
        if self.key is None:
            return
        if not signature:
            raise ProtocolError("bad_signature", "message is not signed; this peer requires an HMAC key")
        if not hmac.compare_digest(self.sign(payload), signature):
            raise ProtocolError("bad_signature", "HMAC signature does not match (wrong key?)")
        if signature in self._seen:
            raise ProtocolError("bad_signature", "replayed message: this signature was seen before")
        self._seen.add(signature)
        self._order.append(signature)
        if len(self._order) > self._history:
            self._seen.discard(self._order.popleft())


def to_frames(signer: Signer, msg: Message) -> list[bytes]:
    payload = encode(msg)
    return [TAG, signer.sign(payload), payload]


def from_frames(signer: Signer, frames: list[bytes], limits: Limits = Limits()) -> Message:
    """Check tag, size and signature, then decode; raises ProtocolError naming the problem."""
    if len(frames) != 3:
        raise ProtocolError("bad_message", f"expected 3 frames (tag, signature, payload), got {len(frames)}")
    tag, signature, payload = frames
    if tag != TAG:
        raise ProtocolError("bad_version" if tag.startswith(b"SPX/") else "bad_message",
                            f"unknown frame tag {bytes(tag[:16])!r}; expected {TAG!r}")
    if len(payload) > limits.max_bytes:
        raise ProtocolError("too_large", f"message of {len(payload)} bytes exceeds the limit of {limits.max_bytes}")
    signer.check(payload, signature)
    return decode(payload, limits)


def load_key(path: str | Path) -> bytes:
    """Read a shared HMAC key file (any non-empty content; `specexec keys` writes 64 hex chars)."""
    path = Path(path).expanduser()
    try:
        key = path.read_bytes().strip()
    except OSError as err:
        raise ValueError(f"cannot read key file {path}: {err.strerror}") from None
    if len(key) < 16:
        raise ValueError(f"key file {path} holds {len(key)} bytes; use at least 16 (e.g. `specexec keys generate`)")
    return key
