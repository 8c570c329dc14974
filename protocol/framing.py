"""Frames on the socket: a tag, a signature, the msgpack payload.

As in Jupyter's wire protocol, each message is signed with a shared key (HMAC-SHA256, checked
with `compare_digest`). The signature frame is `mac (32) | sent_at (8, float64) | epoch (0 or 16)`
and the MAC covers `sent_at | epoch | payload`, so neither can be changed without the key:

- `sent_at` is the sender's wall clock. A message older (or newer) than `max_age_s` is refused,
  and a signature seen within that window is refused as a replay; the window bounds the memory
  of seen signatures by time, not by a count that a busy peer could push a recording out of.
- `epoch` is a verifier's random per-start value. The verifier signs every reply with it and
  accepts from drafters only messages bound to it (a drafter learns it from any reply), so a
  message recorded before a restart is refused by the new process (verifier.server).

Without a key (loopback and ipc use) frames carry an empty signature and nothing is checked.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import struct
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from specexec.protocol.codec import Limits, ProtocolError, decode, encode
from specexec.protocol.messages import Message

TAG = b"SPX/2"
MAC_BYTES = 32
EPOCH_BYTES = 16
_SENT_AT = struct.Struct("<d")
MAX_AGE_S = 300.0  # also the clock difference tolerated between two machines
HISTORY_CAP = 1 << 20  # seen signatures kept at most (32 MiB of digests), whatever the window
MIN_KEY_BYTES = 16
KEY_ENV = "SPECEXEC_HMAC_KEY"


def new_epoch() -> bytes:
    return os.urandom(EPOCH_BYTES)


@dataclass(frozen=True)
class Stamp:
    """What a checked signature bound: the sender's epoch and clock."""

    epoch: bytes = b""
    sent_at: float = 0.0


class Signer:
    def __init__(self, key: bytes | None = None, epoch: bytes = b"", max_age_s: float = MAX_AGE_S,
                 history: int = HISTORY_CAP, clock=time.time):
        self.key = key or None
        self.epoch = epoch  # bound into what this side signs
        self.max_age_s, self._history, self._clock = max_age_s, history, clock
        self._seen: set[bytes] = set()
        self._order: deque[tuple[float, bytes]] = deque()  # (forget after, mac), oldest first

    def sign(self, payload: bytes, epoch: bytes | None = None) -> bytes:
        if self.key is None:
            return b""
        head = _SENT_AT.pack(self._clock()) + (self.epoch if epoch is None else epoch)
        return self._mac(head, payload) + head

    def _mac(self, head: bytes, payload: bytes) -> bytes:
        return hmac.new(self.key, head + payload, hashlib.sha256).digest()

    def check(self, payload: bytes, signature: bytes) -> Stamp:
        if self.key is None:
            return Stamp()
        if not signature:
            raise ProtocolError("bad_signature", "message is not signed; this peer requires an HMAC key")
        if len(signature) not in (MAC_BYTES + _SENT_AT.size, MAC_BYTES + _SENT_AT.size + EPOCH_BYTES):
            raise ProtocolError("bad_signature", f"malformed signature frame of {len(signature)} bytes")
        mac, head = signature[:MAC_BYTES], signature[MAC_BYTES:]
        if not hmac.compare_digest(self._mac(head, payload), mac):
            raise ProtocolError("bad_signature", "HMAC signature does not match (wrong key?)")
        (sent_at,) = _SENT_AT.unpack_from(head)
        now = self._clock()
        age = now - sent_at
        if not math.isfinite(sent_at) or abs(age) > self.max_age_s:
            raise ProtocolError("bad_signature", f"message signed {age:.0f} s ago, outside the {self.max_age_s:.0f} s "
                                "window: a replay, or the two machines' clocks differ (check NTP)")
        self._forget(now)
        if mac in self._seen:
            raise ProtocolError("bad_signature", "replayed message: this signature was seen before")
        self._seen.add(mac)
        self._order.append((now + 2 * self.max_age_s, mac))  # a message is too old by then, whatever its clock
        if len(self._order) > self._history:
            self._seen.discard(self._order.popleft()[1])
        return Stamp(head[_SENT_AT.size:], sent_at)

    def _forget(self, now: float) -> None:
        while self._order and self._order[0][0] < now:
            self._seen.discard(self._order.popleft()[1])

    @property
    def remembered(self) -> int:
        return len(self._order)


def to_frames(signer: Signer, msg: Message, epoch: bytes | None = None) -> list[bytes]:
    payload = encode(msg)
    return [TAG, signer.sign(payload, epoch), payload]


def read_frames(signer: Signer, frames: list[bytes], limits: Limits = Limits()) -> tuple[Message, Stamp]:
    """Check tag, size and signature, then decode; raises ProtocolError naming the problem."""
    if len(frames) != 3:
        raise ProtocolError("bad_message", f"expected 3 frames (tag, signature, payload), got {len(frames)}")
    tag, signature, payload = frames
    if tag != TAG:
        raise ProtocolError("bad_version" if tag.startswith(b"SPX/") else "bad_message",
                            f"unknown frame tag {bytes(tag[:16])!r}; expected {TAG!r}")
    if len(payload) > limits.max_bytes:
        raise ProtocolError("too_large", f"message of {len(payload)} bytes exceeds the limit of {limits.max_bytes}")
    stamp = signer.check(payload, signature)
    return decode(payload, limits), stamp


def from_frames(signer: Signer, frames: list[bytes], limits: Limits = Limits()) -> Message:
    return read_frames(signer, frames, limits)[0]


def _checked(key: bytes, source: str) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{source} holds {len(key)} bytes; use at least {MIN_KEY_BYTES} "
                         "(e.g. `specexec keys generate`)")
    return key


def load_key(path: str | Path) -> bytes:
    """Read a shared HMAC key file (`specexec keys` writes 64 hex chars); it must be private (0600)."""
    from specexec.protocol.security import check_private
    path = Path(path).expanduser()
    try:
        key = path.read_bytes().strip()
        check_private(path)
    except OSError as err:
        raise ValueError(f"cannot read key file {path}: {err.strerror}") from None
    return _checked(key, f"key file {path}")


def key_from_env(value: str | None) -> bytes | None:
    """The key in $SPECEXEC_HMAC_KEY (None when unset or empty), held to the key files' minimum."""
    if not value:
        return None
    return _checked(value.strip().encode(), KEY_ENV)
