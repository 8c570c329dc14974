"""The verifier as a network service: a ZeroMQ ROUTER hosting many drafter sessions.

One thread, one target model, many sessions, each with its own KV cache, sampling parameters,
seeded acceptance and round counter. Every message is checked (frame, size, signature, fields,
tree) before any compute; anything wrong gets an ErrorReply naming the problem and the server
keeps serving everyone else. A repeated round (a drafter re-sending after a reconnect) gets the
cached verdict again instead of being applied twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import zmq

from specexec.protocol.codec import Limits, ProtocolError
from specexec.protocol.framing import Signer, from_frames, to_frames
from specexec.protocol.kv_prune import cache_length
from specexec.protocol.messages import Close, ErrorReply, Hello, Message, Verdict, VerifyRequest, Welcome
from specexec.protocol.security import curve_server, heartbeat
from specexec.protocol.tree import TreeError
from specexec.verifier.session import SessionConfig, TargetSession
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
    max_context: int = 32768


@dataclass
class _Hosted:
    session: TargetSession
    last_used: float
    last_round: int = -1
    last_reply: Verdict | None = None


@dataclass
class ServerStats:
    handled: int = 0
    errors: dict = field(default_factory=dict)
    evicted: int = 0


class VerifierService:
    """Message handling without sockets: one message in, one reply out (testable directly)."""

    def __init__(self, target: TargetModel, fingerprint: str, stop_ids: frozenset[int], config: ServerConfig,
                 model_name: str = "", chat_template: str = "", clock=time.monotonic):
        self.target, self.fingerprint, self.stop_ids = target, fingerprint, stop_ids
        self.config, self.model_name, self.chat_template = config, model_name, chat_template
        self.sessions: dict[str, _Hosted] = {}
        self.stats = ServerStats()
        self.forward_curve: dict[int, float] = {}  # set by `serve --budget auto` (verifier.profile)
        self.clock = clock

    def handle(self, msg: Message) -> Message:
        self.stats.handled += 1
        if isinstance(msg, VerifyRequest):
            return self._verify(msg)
        if isinstance(msg, Hello):
            return self._hello(msg)
        if isinstance(msg, Close):
            self.sessions.pop(msg.session, None)
            return Close(msg.session)
        return self.error("bad_message", f"a verifier does not accept {type(msg).__name__} messages")

    def error(self, code: str, message: str, session: str = "", round_: int = -1) -> ErrorReply:
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
        log.warning("%s: %s%s", code, message, f" (session {session})" if session else "")
        return ErrorReply(code, message, session, round_)

    def _hello(self, msg: Hello) -> Message:
        if msg.fingerprint != self.fingerprint:
            return self.error("fingerprint_mismatch", "the drafter's tokenizer differs from the target's "
                              f"(vocabulary hash {msg.fingerprint[:12]}... vs {self.fingerprint[:12]}...)", msg.session)
        if msg.session not in self.sessions and len(self.sessions) >= self.config.max_sessions:
            self.evict_idle()
            if len(self.sessions) >= self.config.max_sessions:
                return self.error("over_capacity", f"the verifier hosts its maximum of {self.config.max_sessions} "
                                  "sessions; try again later", msg.session)
        config = SessionConfig(msg.sampling, msg.rule, self.stop_ids)
        self.sessions[msg.session] = _Hosted(TargetSession(self.target, config), self.clock())
        limits = self.config.limits
        return Welcome(msg.session, self.target.vocab_size, limits.max_tree_nodes, limits.max_append,
                       self.config.max_context, tuple(sorted(self.stop_ids)), self.model_name, self.chat_template,
                       tuple(sorted(self.forward_curve.items())))

    def _verify(self, msg: VerifyRequest) -> Message:
        hosted = self.sessions.get(msg.session)
        if hosted is None:
            return self.error("unknown_session", "no state for this session (verifier restarted or session "
                              "evicted): open it again and re-send the committed sequence", msg.session, msg.round)
        hosted.last_used = self.clock()
        if msg.round == hosted.last_round and hosted.last_reply is not None:
            return hosted.last_reply  # a re-send after a reconnect: answer again, apply once
        if msg.round <= hosted.last_round:
            return self.error("bad_request", f"round {msg.round} is stale (last verified: {hosted.last_round})",
                              msg.session, msg.round)
        session = hosted.session
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
        verdict = session.verify(msg)
        reply = Verdict(msg.round, verdict.accepted, verdict.bonus, verdict.finished, verdict.verify_s,
                        msg.session, {**verdict.extra, "cached_tokens": session.processed})
        hosted.last_round, hosted.last_reply = msg.round, reply
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
            del self.sessions[victim]
            self.stats.evicted += 1
            log.info("evicted session %s to stay within %d cached tokens", victim, self.config.max_cached_tokens)
        return True

    def evict_idle(self) -> int:
        now = self.clock()
        stale = [sid for sid, h in self.sessions.items() if now - h.last_used > self.config.idle_timeout_s]
        for sid in stale:
            del self.sessions[sid]
            log.info("session %s idle for more than %.0f s: freed", sid, self.config.idle_timeout_s)
        self.stats.evicted += len(stale)
        return len(stale)


class VerifierServer:
    """The socket loop around a VerifierService."""

    def __init__(self, service: VerifierService, ctx: zmq.Context | None = None):
        self.service = service
        self.config = service.config
        self.ctx = ctx or zmq.Context.instance()
        self.signer = Signer(self.config.key)
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # libzmq drops (and disconnects) anything far beyond the protocol limit before it is buffered
        self.sock.setsockopt(zmq.MAXMSGSIZE, 4 * self.config.limits.max_bytes)
        heartbeat(self.sock)
        self.auth = curve_server(self.ctx, self.sock, self.config.curve_dir) if self.config.curve_dir else None
        self.sock.bind(self.config.bind)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._running = False

    def serve(self, poll_ms: int = 1000, should_stop=lambda: False) -> None:
        self._running = True
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while self._running and not should_stop():
            if poller.poll(poll_ms):
                self.serve_one()
            self.service.evict_idle()

    def stop(self) -> None:
        self._running = False

    def serve_one(self) -> None:
        frames = self.sock.recv_multipart()
        identity, rest = frames[0], frames[1:]
        t = time.perf_counter()
        try:
            msg = from_frames(self.signer, rest, self.config.limits)
        except ProtocolError as err:
            reply = self.service.error(err.code, str(err))
        else:
            decode_s = time.perf_counter() - t
            try:
                reply = self.service.handle(msg)
                if isinstance(reply, Verdict):
                    reply.extra["decode_s"] = decode_s
            except Exception as err:  # a bug or a model failure must not take the service down
                log.exception("internal error")
                reply = self.service.error("internal", f"{type(err).__name__}: {err}",
                                           getattr(msg, "session", ""))
        self.sock.send_multipart([identity] + to_frames(self.signer, reply))

    def close(self) -> None:
        if self.auth:
            self.auth.stop()
        self.sock.close(0)
