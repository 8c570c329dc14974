"""Messages of one round (DESIGN.md, "One round") as dataclasses both sides share."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.tree import DraftTree


@dataclass(frozen=True)
class VerifyRequest:
    session: str
    round: int
    append: list[int]  # committed tokens the verifier has not processed yet; the last is the root
    tree: DraftTree
    max_emit: int  # tokens the drafter still wants; the verifier emits at most this many


@dataclass(frozen=True)
class Verdict:
    round: int
    accepted: list[int]  # tree node indices along the accepted path
    bonus: int  # the token emitted after the path
    finished: bool  # a stop token was emitted or max_emit reached
    verify_s: float = 0.0  # target forward + walk, measured by the verifier
    extra: dict = field(default_factory=dict)

    def tokens(self, tree: DraftTree) -> list[int]:
        """The emitted tokens: the accepted nodes' tokens, then the bonus."""
        return [int(tree.tokens[i]) for i in self.accepted] + [int(self.bonus)]
