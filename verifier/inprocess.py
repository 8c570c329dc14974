"""A verifier in the drafter's own process: the `VerifierLink` shape, computed on collect."""

from __future__ import annotations

from specexec.protocol.messages import Verdict, VerifyRequest
from specexec.verifier.session import TargetSession


class InProcessVerifier:
    def __init__(self, session: TargetSession):
        self.session = session
        self._pending: VerifyRequest | None = None

    def submit(self, request: VerifyRequest) -> None:
        if self._pending is not None:
            raise RuntimeError("collect the previous verdict before submitting another tree")
        self._pending = request

    def ready(self) -> bool:
        return self._pending is not None  # nothing runs in the background: collect computes

    def collect(self) -> Verdict:
        if self._pending is None:
            raise RuntimeError("no tree was submitted")
        request, self._pending = self._pending, None
        return self.session.verify(request)
