"""A hard cap on the connections a verifier's socket holds.

libzmq has no option for it: a ROUTER accepts every connection its descriptor limit allows, and
`zmq_unbind` (stop accepting) also drops every connection accepted on that endpoint, drafters
at work included. So a socket monitor, read in a thread of its own, counts the open connections
(`EVENT_ACCEPTED` / `EVENT_DISCONNECTED`), and a connection accepted while `limit` are open is
shut down at once: its peer sees the connection closed, libzmq frees its descriptor, and the
connections accepted before it keep working. Idle peers below the cap are closed by the
handshake timeout (`ServerConfig.handshake_ms`) and heartbeats, which frees their slots.

A descriptor is shut down only when the batch of events read so far still shows it open (its
`EVENT_DISCONNECTED` not yet seen), so a number libzmq has already closed and reused for a
newer connection is left alone unless the newer one's events are still unread (a window of
microseconds; the newer connection would then be refused as if it had arrived over the cap).
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from dataclasses import dataclass

import zmq

from specexec.protocol.security import MAX_CONNECTIONS  # noqa: F401 (re-exported: the cap's default)
from zmq.utils.monitor import recv_monitor_message


log = logging.getLogger("specexec.verifier")


@dataclass
class CapStats:
    open: int = 0
    peak: int = 0  # the most connections open at once
    accepted: int = 0
    refused: int = 0  # shut down on arrival: the cap was full


class ConnectionCap:
    """Keep at most `limit` connections open on `sock`. Start it before `sock.bind`."""

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, limit: int):
        self.limit, self.stats = limit, CapStats()
        self._open: set[int] = set()
        self._sock = sock
        address = f"inproc://specexec-connection-cap-{uuid.uuid4().hex}"
        sock.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._events = ctx.socket(zmq.PAIR)
        self._events.setsockopt(zmq.RCVHWM, 0)  # libzmq drops monitor events past the queue's HWM: no HWM
        self._events.connect(address)
        self._lock = threading.Lock()  # the monitor socket is read by the cap's thread and by `admits`
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connection-cap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._catch_up()

    def _catch_up(self) -> None:
        with self._lock:
            if self._events.poll(0):
                self._apply(self._drain())

    def admits(self, fd: int) -> bool:
        """Whether a message that came in on descriptor `fd` may be served: its connection is one
        the cap counts as open. The events not yet read are read first: without CURVE a connection
        over the cap can complete its handshake and send before the thread shuts it down."""
        self._catch_up()
        with self._lock:
            return fd in self._open

    def _drain(self) -> list[dict]:
        events = [recv_monitor_message(self._events)]
        while self._events.poll(0):
            events.append(recv_monitor_message(self._events))
        return events

    def _apply(self, events: list[dict]) -> None:
        refuse: set[int] = set()
        for event in events:
            fd = event["value"]
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._open.discard(fd)
                refuse.discard(fd)
            elif len(self._open) >= self.limit:
                refuse.add(fd)
            else:
                self._open.add(fd)
                self.stats.accepted += 1
        self.stats.open = len(self._open)
        self.stats.peak = max(self.stats.peak, self.stats.open)
        for fd in refuse:
            self._shut(fd)

    def _shut(self, fd: int) -> None:
        self.stats.refused += 1
        if self.stats.refused in (1, 10, 100) or self.stats.refused % 1000 == 0:
            log.warning("connection refused: %d open, the cap (--max-connections) is %d (%d refused so far)",
                        len(self._open), self.limit, self.stats.refused)
        try:
            with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as dup:  # a duplicate: libzmq closes fd
                dup.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed by libzmq
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._events.close(0)
