"""The drafter's view of a verifier: submit a tree now, collect its verdict later.

The asynchronous shape is what lets the drafter keep growing its search while the target
verifies. Implementations: `verifier.inprocess.InProcessVerifier` (same process, computes on
collect) and the ZeroMQ client in `drafter`.
"""

from __future__ import annotations

from typing import Protocol

from specexec.protocol.messages import VerifyRequest, Verdict


class UnknownSession(RuntimeError):
    """The verifier holds no state for this session (restart, eviction): re-send everything."""


class LinkError(RuntimeError):
    """The verifier cannot be used any more (unreachable, or it refused us); generation stops
    there and keeps what it has."""


class VerifierLink(Protocol):
    def submit(self, request: VerifyRequest) -> None:
        """Hand a tree to the verifier; returns at once."""

    def ready(self) -> bool:
        """True once `collect` would return without waiting on the target."""

    def collect(self) -> Verdict:
        """The verdict for the last submitted request; raises UnknownSession when it was lost."""
