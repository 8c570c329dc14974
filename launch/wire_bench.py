"""What the wire costs per round: encode + send + receive + decode, against the target's forward.

A verifier stub on a loopback TCP socket decodes each request (checking its signature, as
the real server does) and answers with a verdict; the client times the whole exchange. The
target's own forward over a tree of the same size, on a 256-token prefix, gives the fraction.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

import numpy as np
import zmq

from specexec.protocol.codec import Limits, encode
from specexec.protocol.framing import Signer, from_frames, to_frames
from specexec.protocol.messages import Verdict, VerifyRequest
from specexec.protocol.tree import DraftTree

KEY = b"wire-bench-key-0123456789abcdef"


def random_tree(n: int, vocab: int = 151936, seed: int = 0) -> DraftTree:
    """A topological tree of n nodes with distinct siblings, shaped like a best-first tree."""
    rng = np.random.default_rng(seed)
    parents = [-1 if i == 0 else int(rng.integers(-1, i)) if rng.random() < 0.3 else i - 1 for i in range(n)]
    tokens = rng.choice(vocab, size=n, replace=False)
    return DraftTree.build(tokens, parents)


@dataclass
class WireRow:
    nodes: int
    request_bytes: int
    bytes_per_node: float
    round_trip_ms: float
    forward_ms: float | None = None

    @property
    def fraction(self) -> float | None:
        return self.round_trip_ms / self.forward_ms if self.forward_ms else None


def _stub(sock: zmq.Socket, stop: threading.Event) -> None:
    signer = Signer(KEY)
    limits = Limits(max_tree_nodes=1 << 16)
    while not stop.is_set():
        if not sock.poll(50):
            continue
        identity, *frames = sock.recv_multipart()
        req = from_frames(signer, frames, limits)
        reply = Verdict(req.round, [0, 1, 2], 7, False, 0.0, req.session)
        sock.send_multipart([identity] + to_frames(signer, reply))


def measure(sizes=(64, 256, 1024), trials: int = 50, append: int = 1) -> list[WireRow]:
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = ctx.socket(zmq.DEALER)
    client.connect(f"tcp://127.0.0.1:{port}")
    stop = threading.Event()
    thread = threading.Thread(target=_stub, args=(server, stop), daemon=True)
    thread.start()
    signer, rows = Signer(KEY), []
    try:
        for n in sizes:
            tree = random_tree(n)
            times = []
            for trial in range(trials + 5):
                req = VerifyRequest("wire", trial, list(range(append)), tree, 64)
                t = time.perf_counter()
                client.send_multipart(to_frames(signer, req))
                from_frames(signer, client.recv_multipart())
                if trial >= 5:
                    times.append(time.perf_counter() - t)
            size = len(encode(VerifyRequest("wire", 0, list(range(append)), tree, 64)))
            rows.append(WireRow(n, size, size / n, statistics.median(times) * 1e3))
    finally:
        stop.set()
        thread.join()
        client.close(0)
        server.close(0)
        ctx.term()
    return rows


def target_forward_ms(target, n: int, prefix: int = 256, trials: int = 2) -> float:
    """Median time of one verification forward over an n-node tree on a `prefix`-token cache."""
    best = []
    for _ in range(trials):
        cache = target.new_cache()
        target.forward(cache, list(range(100, 100 + prefix)), DraftTree.empty())
        t = time.perf_counter()
        target.forward(cache, [5], random_tree(n, target.vocab_size))
        best.append(time.perf_counter() - t)
    return statistics.median(best) * 1e3


def format_rows(rows: list[WireRow]) -> str:
    out = ["nodes | request bytes | bytes/node | round trip ms | target forward ms | fraction",
           "------+---------------+------------+---------------+-------------------+---------"]
    for r in rows:
        fwd = f"{r.forward_ms:.0f}" if r.forward_ms else "-"
        frac = f"{100 * r.fraction:.3f}%" if r.fraction is not None else "-"
        out.append(f"{r.nodes:5d} | {r.request_bytes:13d} | {r.bytes_per_node:10.2f} | {r.round_trip_ms:13.3f} | "
                   f"{fwd:>17} | {frac:>8}")
    return "\n".join(out)
