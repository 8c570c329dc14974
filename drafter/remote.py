"""The drafter's side of the network: a DEALER socket speaking to a verifier's ROUTER.

`RemoteVerifier` is a `VerifierLink`: `submit` sends and returns, `ready` polls, `collect`
waits. ZMTP heartbeats let libzmq notice a dead verifier within a few seconds even while the
target is busy; a socket monitor tells us about disconnects and reconnects, and the request in
flight is sent again after a reconnect (the verifier answers a repeated round from its cache, so
nothing is applied twice). A verifier that comes back without our session answers
`unknown_session`: we open the session again and raise UnknownSession, and the generation loop
re-sends its whole committed sequence. A verifier unreachable past `timeout_s` raises
VerifierUnreachable; the loop keeps and returns what was generated.

The socket carries its own routing identity, so the verifier knows a reconnected drafter as the
owner of its session. Every signed reply carries the verifier's per-start epoch; we adopt it and
bind it into what we sign next (a first Hello, or one after a restart, is refused once as
`stale_epoch` and signed again). A CURVE handshake the verifier refuses is reported as such
(HandshakeRefused: wrong server key, or our key not authorized) instead of waiting for the
deadline and reporting no connection.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from specexec.protocol.codec import Limits, ProtocolError
from specexec.protocol.framing import Signer, read_frames, to_frames
from specexec.protocol.link import LinkError, UnknownSession
from specexec.protocol.messages import Close, ErrorReply, Hello, Verdict, VerifyRequest, Welcome
from specexec.protocol.security import HANDSHAKE_MS, curve_client, heartbeat


class VerifierUnreachable(LinkError):
    """No connection to the verifier for longer than the deadline."""


class HandshakeRefused(LinkError):
    """The verifier refused our CURVE handshake: its key is not the one we hold, or ours is not authorized
    (or it closed the connection: it may hold its maximum of connections)."""


HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the verifier refused this client's CURVE key: it is not in the verifier's "
                                     "authorized/ directory (copy DIR/client.key there)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake protocol error: CURVE is on at one side only (pass the same "
                                         "--curve-dir setting on both sides)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the verifier dropped the CURVE handshake: the server.key here is not "
                                          "this verifier's (copy DIR/server.key from the verifier's box)",
}
CAP_FULL = ", or the verifier holds its maximum of connections (serve --max-connections): try again later"
HANDSHAKE_RETRIES = 3  # unexplained handshake failures in a row before we give up (the others: at once)
# ... and for at least this long: a verifier at its connection cap frees the slots idle peers hold
# within its handshake timeout, so a drafter turned away by a full cap gets in before then
DROPPED_GRACE_S = HANDSHAKE_MS / 1000 + 1.0
STALE_EPOCH_RESENDS = 3


class VerifierRejected(LinkError):
    """The verifier answered with an error; `code` says which (protocol.messages.ERROR_CODES)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"verifier refused ({code}): {message}")
        self.code = code


@dataclass
class LinkStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    codec_s: float = 0.0  # encode + send + receive + decode on this side
    server_codec_s: float = 0.0  # decode on the verifier's side, as it reports
    reconnects: int = 0
    resends: int = 0


class RemoteVerifier:
    def __init__(self, address: str, hello: Hello, key: bytes | None = None, curve_dir: str | None = None,
                 timeout_s: float = 60.0, ctx: zmq.Context | None = None, limits: Limits = Limits()):
        self.address, self.hello, self.timeout_s, self.limits = address, hello, timeout_s, limits
        self.ctx = ctx or zmq.Context.instance()
        self.signer = Signer(key)
        self.stats = LinkStats()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, b"D" + os.urandom(15))  # kept across reconnects: we own our session
        heartbeat(self.sock)
        self.curve = bool(curve_dir)
        if curve_dir:
            curve_client(self.sock, curve_dir)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                                    | sum(HANDSHAKE_FAILURES))
        self.sock.connect(address)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self._inflight: VerifyRequest | None = None
        self._awaiting = None  # the message whose reply we wait for: re-sent after a reconnect
        self._connected, self._ever_connected = False, False
        self._down_since = time.monotonic()
        self._heard = False  # a message came in since the last disconnect
        self._handshake_failures, self._dropped_since = 0, None
        self._refused: int | None = None  # the last handshake failure's event, until a handshake succeeds
        self.welcome: Welcome | None = None

    # -- session ------------------------------------------------------------------------------

    def open(self) -> Welcome:
        """Send the handshake and wait for the verifier's limits."""
        self._awaiting = self.hello
        self._send(self.hello)
        # Replies to anything sent before this Hello arrive first (one connection, in order) and
        # are dropped here; a Hello's own error carries no round.
        wanted = (lambda m: (isinstance(m, Welcome) and m.session == self.hello.session)
                  or (isinstance(m, ErrorReply) and m.round == -1 and m.session in ("", self.hello.session)))
        reply = self._wait(wanted)
        for _ in range(STALE_EPOCH_RESENDS):  # now signed with the epoch just learned; a Hello re-sent after a
            if not (isinstance(reply, ErrorReply) and reply.code == "stale_epoch"):  # dropped connection is
                break  # answered twice: another stale_epoch, then a Welcome
            self._send(self.hello)
            reply = self._wait(wanted)
        if isinstance(reply, ErrorReply):
            raise VerifierRejected(reply.code, reply.message)
        self.welcome, self._awaiting = reply, None
        return reply

    def close(self, wait_s: float = 1.0) -> None:
        """Tell the verifier to free our session (waiting briefly for its ack), then disconnect."""
        if self._connected:
            try:
                self._send(Close(self.hello.session))
                deadline = time.monotonic() + wait_s
                while (left := deadline - time.monotonic()) > 0 and self.sock.poll(int(left * 1000)):
                    if isinstance(read_frames(self.signer, self.sock.recv_multipart(), self.limits)[0], Close):
                        break
            except (zmq.ZMQError, ProtocolError):
                pass
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)

    # -- VerifierLink ---------------------------------------------------------------------------

    def submit(self, request: VerifyRequest) -> None:
        self._inflight = self._awaiting = request
        self._send(request)

    def ready(self) -> bool:
        return bool(self.sock.poll(0, zmq.POLLIN))

    def collect(self) -> Verdict:
        request = self._inflight
        if request is None:
            raise RuntimeError("no tree was submitted")
        reply = self._wait(lambda m: (isinstance(m, Verdict) and m.round == request.round)
                           or (isinstance(m, ErrorReply) and m.session in ("", request.session)
                               and m.round in (-1, request.round)))
        if isinstance(reply, ErrorReply):
            if reply.code == "unknown_session":
                self.open()
                raise UnknownSession(reply.message)
            raise VerifierRejected(reply.code, reply.message)
        self._inflight = self._awaiting = None
        self.stats.server_codec_s += float(reply.extra.get("decode_s", 0.0))
        return reply

    # -- plumbing -------------------------------------------------------------------------------

    def _send(self, msg) -> None:
        t = time.perf_counter()
        frames = to_frames(self.signer, msg)
        if len(frames[2]) > self.limits.max_bytes:  # the verifier would drop the connection without a reply
            raise VerifierRejected("too_large", f"message of {len(frames[2])} bytes exceeds the limit of "
                                   f"{self.limits.max_bytes}")
        self.sock.send_multipart(frames)
        self.stats.codec_s += time.perf_counter() - t
        self.stats.bytes_sent += sum(len(f) for f in frames)

    def _wait(self, wanted):
        """Receive until `wanted(msg)`; resend after reconnects; give up after `timeout_s` offline."""
        while True:
            events = dict(self.poller.poll(200))
            if self.monitor in events:
                self._on_monitor_event(recv_monitor_message(self.monitor))
            if self.sock in events:
                t = time.perf_counter()
                frames = self.sock.recv_multipart()
                self.stats.bytes_received += sum(len(f) for f in frames)
                try:
                    msg, stamp = read_frames(self.signer, frames, self.limits)
                except ProtocolError as err:
                    raise VerifierRejected(err.code, f"unreadable reply: {err}") from None
                self._heard = True
                if stamp.epoch:
                    self.signer.epoch = stamp.epoch
                self.stats.codec_s += time.perf_counter() - t
                if wanted(msg):
                    return msg
            if not self._connected and time.monotonic() - self._down_since > self.timeout_s:
                if self._refused is not None:  # the deadline came before the grace for dropped handshakes
                    raise HandshakeRefused(f"{self.address}: {self._handshake_failure(self._refused)}")
                raise VerifierUnreachable(f"no connection to the verifier at {self.address} for "
                                          f"{self.timeout_s:.0f} s (not running, not reachable, or holding its "
                                          "maximum of connections: serve --max-connections)")

    def _handshake_failure(self, event: int) -> str:
        """What a refused handshake means; without CURVE here, any refusal means the verifier has it on."""
        dropped = CAP_FULL if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL else ""  # a closed connection
        if not self.curve:
            return HANDSHAKE_FAILURES[zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL] + dropped
        return HANDSHAKE_FAILURES[event] + dropped

    def _on_monitor_event(self, event: dict) -> None:
        if event["event"] in HANDSHAKE_FAILURES:
            self._handshake_failures, self._refused = self._handshake_failures + 1, event["event"]
            now = time.monotonic()
            self._dropped_since = self._dropped_since or now
            if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL or (
                    self._handshake_failures >= HANDSHAKE_RETRIES and now - self._dropped_since >= DROPPED_GRACE_S):
                raise HandshakeRefused(f"{self.address}: {self._handshake_failure(event['event'])}")
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            if self._connected:  # unreachable counts from the last connection that answered: a verifier
                self._connected = False  # that drops every connection at once (at its cap) is not reached
                if self._heard:
                    self._down_since, self._heard = time.monotonic(), False
        elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            reconnect = self._ever_connected and not self._connected
            self._connected = self._ever_connected = True
            self._handshake_failures, self._dropped_since, self._refused = 0, None, None
            if reconnect:
                self.stats.reconnects += 1
                if self._awaiting is not None:
                    self.stats.resends += 1
                    self._send(self._awaiting)
