"""A verifier server in a background thread, and helpers to talk to it, for tests."""

from __future__ import annotations

import os
import threading
import uuid

import zmq

from specexec.drafter.draft_model import DraftModel
from specexec.drafter.remote import RemoteVerifier
from specexec.drafter.session import DraftSession
from specexec.drafter.search_api import make_search
from specexec.drafter.tree_search import TreeConfig
from specexec.protocol.codec import Limits
from specexec.protocol.framing import Signer, read_frames, to_frames
from specexec.protocol.messages import ErrorReply, Hello
from specexec.protocol.sampling import SamplingParams
from specexec.protocol.security import curve_client
from specexec.verifier.server import ServerConfig, VerifierServer, VerifierService
from specexec.verifier.target_model import TargetModel

FINGERPRINT = "tiny-fingerprint"
KEY = b"0123456789abcdef0123456789abcdef"


class ServedVerifier:
    def __init__(self, model, key=KEY, bind="tcp://127.0.0.1:*", curve_dir=None, **config):
        cfg = ServerConfig(bind=bind, key=key, curve_dir=curve_dir, **config)
        self.service = VerifierService(TargetModel(model), FINGERPRINT, frozenset(), cfg)
        self.ctx = zmq.Context()
        self.server = VerifierServer(self.service, self.ctx)
        self.address = self.server.address
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self.server.serve,
                                       kwargs=dict(poll_ms=20, should_stop=self._stop.is_set), daemon=True)
        self.thread.start()

    def close(self):
        self._stop.set()
        self.thread.join(10)
        self.server.close()
        self.ctx.term()  # returns once the socket is really closed and its port free

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RawClient:
    """A DEALER that sends whatever frames a test wants and decodes the replies."""

    def __init__(self, address, key=KEY, curve_dir=None, routing_id=None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.routing_id = routing_id or b"R" + os.urandom(15)  # as a drafter: the same owner after reconnects
        self.sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        if curve_dir is not None:
            curve_client(self.sock, curve_dir)
        self.sock.connect(address)
        self.signer = Signer(key)

    def send_frames(self, frames):
        self.sock.send_multipart(frames)

    def send(self, msg):
        self.send_frames(to_frames(self.signer, msg))

    def recv(self, timeout_ms=10000):
        """The next reply; like a drafter, adopt the verifier's epoch from it."""
        assert self.sock.poll(timeout_ms), "no reply from the server"
        msg, stamp = read_frames(Signer(self.signer.key), self.sock.recv_multipart(), Limits(max_bytes=1 << 30))
        if stamp.epoch:
            self.signer.epoch = stamp.epoch
        return msg

    def ask(self, msg):
        """Send and wait for the reply; a Hello refused only for its epoch is signed again, as a drafter does."""
        self.send(msg)
        reply = self.recv()
        if isinstance(msg, Hello) and isinstance(reply, ErrorReply) and reply.code == "stale_epoch":
            self.send(msg)
            reply = self.recv()
        return reply

    def close(self):
        self.sock.close(0)
        self.ctx.term()


def remote_run(address, draft, prompt, n, method="specexec", budget=16, params=SamplingParams(), overlap=False,
               key=KEY, timeout_s=20.0, fingerprint=FINGERPRINT, **tree_kw):
    """Generate through a RemoteVerifier, as `specexec generate --connect` does."""
    config = TreeConfig(method=method, budget=0 if method == "autoregressive" else budget, **tree_kw)
    session = uuid.uuid4().hex
    link = RemoteVerifier(address, Hello(session, fingerprint, params, config.rule), key, timeout_s=timeout_s)
    try:
        link.open()
        search = None if method == "autoregressive" else make_search(
            draft if isinstance(draft, DraftModel) else DraftModel(draft), config, params)
        return DraftSession(link, config, search, n, overlap=overlap, session_id=session).generate(list(prompt))
    finally:
        link.close()
