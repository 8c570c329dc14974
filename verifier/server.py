"""The verifier as a network service: a ZeroMQ ROUTER hosting many drafter sessions.

One thread, one target model, many sessions, each with its own KV cache, sampling parameters,
seeded acceptance and round counter. Every message is checked (frame, size, signature, epoch,
owner, fields, tree) before any compute; anything wrong gets an ErrorReply naming the problem
and the server keeps serving everyone else.

- A session belongs to the connection that opened it: its ZeroMQ routing identity (a drafter
  sets its own, so it survives reconnects) and, where CURVE is on, the client's public key.
  Messages about it from anyone else get `not_owner` and touch nothing.
- A repeated round (a drafter re-sending after a reconnect) gets the cached verdict again
  instead of being applied twice.
- Requests are verified in steps (verifier.session): the loop runs one prefill chunk of one
  session, then reads the socket and serves the others, so a long prefill delays another
  session's round by at most one chunk per busy session.
"""

from __future__ import annotations

import itertools
import logging
import resource
import time
from dataclasses import dataclass, field

import zmq

from specexec.protocol.codec import Limits, ProtocolError
from specexec.protocol.framing import Signer, new_epoch, read_frames, to_frames
from specexec.protocol.kv_prune import cache_length
from specexec.protocol.messages import Close, ErrorReply, Hello, Message, Verdict, VerifyRequest, Welcome
from specexec.protocol.security import HANDSHAKE_MS, curve_server, heartbeat
from specexec.protocol.tree import TreeError
from specexec.verifier.connection_cap import MAX_CONNECTIONS, ConnectionCap
from specexec.verifier.session import PREFILL_CHUNK, SessionConfig, TargetSession
from specexec.verifier.target_model import TargetModel

log = logging.getLogger("specexec.verifier")


@dataclass(frozen=True)
class ServerConfig:
    bind: str = "tcp://127.0.0.1:5555"
    key: bytes | None = None
    curve_dir: str | None = None
    limits: Limits = Limits()
    max_sessions: int = 16
    max_cached_tokens: int = 1 << 18  # over all sessions; least recently used sessions are evicted
    idle_timeout_s: float = 600.0
    unused_grace_s: float = 5.0  # under pressure, a session that never verified a round goes first after this
    max_context: int = 32768
    prefill_chunk: int = PREFILL_CHUNK
    handshake_ms: int = HANDSHAKE_MS  # a connection that has not completed its ZMTP/CURVE handshake by then is closed
    inbound_queue: int = 4  # messages queued per connection before libzmq stops reading it (a drafter has 1-2)
    max_connections: int = MAX_CONNECTIONS  # a connection arriving while this many are open is closed at once


@dataclass(frozen=True)
class Peer:
    """Who sent a message: the connection's routing identity and, with CURVE, the client's public key."""

    identity: bytes = b""
    user: str = ""


@dataclass
class _Hosted:
    session: TargetSession
    owner: Peer
    last_used: float
    last_round: int = -1
    last_reply: Verdict | None = None
    decode_s: float = 0.0  # of the request in progress
    turn: int = 0  # when its work last advanced (round robin between busy sessions)


@dataclass
class ServerStats:
    handled: int = 0
    errors: dict = field(default_factory=dict)
    evicted: int = 0


class VerifierService:
    """Message handling without sockets: one message in, at most one reply out (testable directly).

    `handle` answers at once, or returns None for a request now in progress; `step` advances the
    requests in progress by one forward and returns the replies that became ready."""

    def __init__(self, target: TargetModel, fingerprint: str, stop_ids: frozenset[int], config: ServerConfig,
                 model_name: str = "", chat_template: str = "", clock=time.monotonic):
        self.target, self.fingerprint, self.stop_ids = target, fingerprint, stop_ids
        self.config, self.model_name, self.chat_template = config, model_name, chat_template
        self.sessions: dict[str, _Hosted] = {}
        self.stats = ServerStats()
        self.forward_curve: dict[int, float] = {}  # set by `serve --budget auto` (verifier.profile)
        self.clock = clock
        self._turns = itertools.count(1)
        self._outbox: list[tuple[Peer, Message]] = []

    def handle(self, msg: Message, peer: Peer = Peer(), decode_s: float = 0.0) -> Message | None:
        self.stats.handled += 1
        if isinstance(msg, VerifyRequest):
            return self._verify(msg, peer, decode_s)
        if isinstance(msg, Hello):
            return self._hello(msg, peer)
        if isinstance(msg, Close):
            return self._close(msg, peer)
        return self.error("bad_message", f"a verifier does not accept {type(msg).__name__} messages")

    def error(self, code: str, message: str, session: str = "", round_: int = -1, quiet: bool = False) -> ErrorReply:
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
        log.log(logging.DEBUG if quiet else logging.WARNING, "%s: %s%s", code, message,
                f" (session {session})" if session else "")
        return ErrorReply(code, message, session, round_)

    def _not_owner(self, session: str) -> ErrorReply:
        return self.error("not_owner", "this session belongs to another connection; nothing was done",
                          session)

    def _hello(self, msg: Hello, peer: Peer) -> Message:
        if msg.fingerprint != self.fingerprint:
            return self.error("fingerprint_mismatch", "the drafter's tokenizer differs from the target's "
                              f"(vocabulary hash {msg.fingerprint[:12]}... vs {self.fingerprint[:12]}...)", msg.session)
        existing = self.sessions.get(msg.session)
        if existing is not None and existing.owner != peer:
            return self.error("not_owner", "this session id is in use by another connection; choose another",
                              msg.session)
        if existing is None:  # a repeated Hello from the owner (a re-send after a reconnect) changes nothing
            if len(self.sessions) >= self.config.max_sessions and not self._free_a_slot():
                return self.error("over_capacity", f"the verifier hosts its maximum of {self.config.max_sessions} "
                                  "sessions; try again later", msg.session)
            config = SessionConfig(msg.sampling, msg.rule, self.stop_ids, self.config.prefill_chunk)
            self.sessions[msg.session] = _Hosted(TargetSession(self.target, config), peer, self.clock())
        limits = self.config.limits
        return Welcome(msg.session, self.target.vocab_size, limits.max_tree_nodes, limits.max_append,
                       self.config.max_context, tuple(sorted(self.stop_ids)), self.model_name, self.chat_template,
                       tuple(sorted(self.forward_curve.items())), self.target.offloaded)

    def _free_a_slot(self) -> bool:
        """Evict idle sessions; failing that, the oldest session that never verified a round."""
        if self.evict_idle():
            return True
        now = self.clock()
        unused = [(h.last_used, sid) for sid, h in self.sessions.items()
                  if h.session.rounds == 0 and h.session.work is None and now - h.last_used >= self.config.unused_grace_s]
        if not unused:
            return False
        _, victim = min(unused)
        self._drop(victim, f"never used for {now - self.sessions[victim].last_used:.0f} s, evicted for a new session")
        return True

    def _close(self, msg: Close, peer: Peer) -> Message:
        hosted = self.sessions.get(msg.session)
        if hosted is not None and hosted.owner != peer:
            return self._not_owner(msg.session)
        self.sessions.pop(msg.session, None)
        return Close(msg.session)

    def _verify(self, msg: VerifyRequest, peer: Peer, decode_s: float) -> Message | None:
        hosted = self.sessions.get(msg.session)
        if hosted is None:
            return self.error("unknown_session", "no state for this session (verifier restarted or session "
                              "evicted): open it again and re-send the committed sequence", msg.session, msg.round)
        if hosted.owner != peer:
            return self._not_owner(msg.session)
        hosted.last_used = self.clock()
        session = hosted.session
        if session.work is not None:
            if msg.round == session.work.request.round:
                return None  # a re-send of the request in progress: answered when it is done
            return self.error("bad_request", f"round {msg.round} arrived while round {session.work.request.round} "
                              "is being verified", msg.session, msg.round)
        if msg.round == hosted.last_round and hosted.last_reply is not None:
            return hosted.last_reply  # a re-send after a reconnect: answer again, apply once
        if msg.round <= hosted.last_round:
            return self.error("bad_request", f"round {msg.round} is stale (last verified: {hosted.last_round})",
                              msg.session, msg.round)
        total = session.processed + len(msg.append) + len(msg.tree)
        if total > self.config.max_context:
            return self.error("too_large", f"committed + tree = {total} tokens exceeds the target's context of "
                              f"{self.config.max_context}", msg.session, msg.round)
        try:
            session.check(msg)
        except (TreeError, ValueError) as err:
            return self.error("bad_tree", str(err), msg.session, msg.round)
        incoming = len(msg.append) + len(msg.tree)
        if not self._make_room(msg.session, incoming):
            return self.error("over_capacity", f"this request needs {session.processed + incoming} cached tokens; "
                              f"the verifier's cache budget is {self.config.max_cached_tokens}", msg.session, msg.round)
        session.begin(msg)
        hosted.decode_s = decode_s
        return None

    @property
    def busy(self) -> bool:
        return any(h.session.work is not None for h in self.sessions.values())

    def step(self) -> list[tuple[Peer, Message]]:
        """Advance the least recently advanced request in progress by one forward; returns ready replies."""
        busy = [(h.turn, sid) for sid, h in self.sessions.items() if h.session.work is not None]
        if busy:
            _, sid = min(busy)
            self._advance(sid, self.sessions[sid])
        out, self._outbox = self._outbox, []
        return out

    def _advance(self, sid: str, hosted: _Hosted) -> None:
        hosted.turn = next(self._turns)
        round_ = hosted.session.work.request.round
        try:
            verdict = hosted.session.advance()
        except Exception as err:  # a bug or a model failure must not take the service down
            log.exception("internal error")
            self._outbox.append((hosted.owner, self.error("internal", f"{type(err).__name__}: {err}", sid, round_)))
            return
        if verdict is None:
            return
        reply = Verdict(verdict.round, verdict.accepted, verdict.bonus, verdict.finished, verdict.verify_s, sid,
                        {**verdict.extra, "cached_tokens": hosted.session.processed, "decode_s": hosted.decode_s})
        hosted.last_round, hosted.last_reply = verdict.round, reply
        self._outbox.append((hosted.owner, reply))

    def verify_now(self, msg: VerifyRequest, peer: Peer = Peer()) -> Message:
        """`handle` a request and run it to its reply (tests and single-client use)."""
        reply = self.handle(msg, peer)
        while reply is None:
            ready = [r for p, r in self.step() if getattr(r, "session", None) == msg.session]
            reply = ready[-1] if ready else None
        return reply

    def cached_tokens(self) -> int:
        return sum(cache_length(h.session.cache) for h in self.sessions.values())

    def _make_room(self, keep: str, incoming: int) -> bool:
        """Evict least recently used sessions holding cache until the budget fits the incoming tokens;
        False when even evicting every other session would not make room."""
        while self.cached_tokens() + incoming > self.config.max_cached_tokens:
            others = [(h.last_used, sid) for sid, h in self.sessions.items()
                      if sid != keep and cache_length(h.session.cache)]
            if not others:
                return False
            _, victim = min(others)
            self._drop(victim, f"evicted to stay within {self.config.max_cached_tokens} cached tokens")
        return True

    def _drop(self, sid: str, why: str) -> None:
        """Free a session; a request of it in progress is answered `unknown_session`."""
        hosted = self.sessions.pop(sid)
        self.stats.evicted += 1
        log.info("session %s %s", sid, why)
        if hosted.session.work is not None:
            self._outbox.append((hosted.owner, self.error(
                "unknown_session", f"session {why}: open it again and re-send the committed sequence",
                sid, hosted.session.work.request.round)))

    def evict_idle(self) -> int:
        now = self.clock()
        stale = [sid for sid, h in self.sessions.items()
                 if now - h.last_used > self.config.idle_timeout_s and h.session.work is None]
        for sid in stale:
            self._drop(sid, f"idle for more than {self.config.idle_timeout_s:.0f} s: freed")
        return len(stale)


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft descriptor limit to the hard one; returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


class VerifierServer:
    """The socket loop around a VerifierService."""

    def __init__(self, service: VerifierService, ctx: zmq.Context | None = None):
        self.service = service
        self.config = service.config
        self.fd_limit = raise_fd_limit()
        self.ctx = ctx or zmq.Context.instance()
        self.signer = Signer(self.config.key, epoch=new_epoch())
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # libzmq disconnects a peer announcing a frame over the protocol limit before buffering it
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.config.limits.max_bytes)
        self.sock.setsockopt(zmq.RCVHWM, self.config.inbound_queue)
        self.sock.setsockopt(zmq.HANDSHAKE_IVL, self.config.handshake_ms)
        heartbeat(self.sock)
        self.auth = curve_server(self.ctx, self.sock, self.config.curve_dir) if self.config.curve_dir else None
        self.cap = ConnectionCap(self.ctx, self.sock, self.config.max_connections)
        self.sock.bind(self.config.bind)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._running = False

    def serve(self, poll_ms: int = 1000, should_stop=lambda: False) -> None:
        self._running = True
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while self._running and not should_stop():
            if poller.poll(0 if self.service.busy else poll_ms):
                self.serve_one()
            for peer, reply in self.service.step():
                self._send(peer.identity, reply)
            self.service.evict_idle()

    def stop(self) -> None:
        self._running = False

    def serve_one(self) -> None:
        frames = self.sock.recv_multipart(copy=False)
        if not self._admitted(frames[-1]):  # a connection over the cap, being shut down: told so, not served
            self._send(frames[0].bytes, self.service.error(
                "over_capacity", f"the verifier holds its maximum of connections ({self.config.max_connections}, "
                "serve --max-connections): try again later", quiet=True))
            return
        peer = Peer(frames[0].bytes, self._user(frames[-1]))
        rest = [f.bytes for f in frames[1:]]
        t = time.perf_counter()
        try:
            msg, stamp = read_frames(self.signer, rest, self.config.limits)
        except ProtocolError as err:
            reply = self.service.error(err.code, str(err))
        else:
            decode_s = time.perf_counter() - t
            if self.signer.key is not None and stamp.epoch != self.signer.epoch:
                reply = self._epoch_error(msg, stamp.epoch)
            else:
                try:
                    reply = self.service.handle(msg, peer, decode_s)
                except Exception as err:  # a bug or a model failure must not take the service down
                    log.exception("internal error")
                    reply = self.service.error("internal", f"{type(err).__name__}: {err}",
                                               getattr(msg, "session", ""))
        if reply is not None:
            self._send(peer.identity, reply)

    def _admitted(self, frame: zmq.Frame) -> bool:
        try:
            fd = frame.get(zmq.SRCFD)
        except (zmq.ZMQError, AttributeError):  # a transport without descriptors
            return True
        return fd < 0 or self.cap.admits(fd)

    def _user(self, frame: zmq.Frame) -> str:
        if self.auth is None:
            return ""
        try:
            return frame.get("User-Id")
        except (zmq.ZMQError, KeyError):
            return ""

    def _epoch_error(self, msg: Message, epoch: bytes) -> ErrorReply:
        session = getattr(msg, "session", "")
        if isinstance(msg, Hello):  # first contact, or a re-open after a restart: normal, not a warning
            return self.service.error("stale_epoch", "this Hello was signed for another start of this verifier "
                                      "(or none): sign it again with the epoch of this reply", session, quiet=True)
        return self.service.error("unknown_session", f"message signed for an earlier start of this verifier "
                                  f"(epoch {epoch.hex()[:8] or 'none'}, now {self.signer.epoch.hex()[:8]}): its "
                                  "sessions are gone; open the session again and re-send the committed sequence",
                                  session, getattr(msg, "round", -1))

    def _send(self, identity: bytes, reply: Message) -> None:
        self.sock.send_multipart([identity] + to_frames(self.signer, reply))

    def close(self) -> None:
        if self.auth:
            self.auth.stop()
        self.cap.close()
        self.sock.close(0)
