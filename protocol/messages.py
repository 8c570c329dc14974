"""The messages of the wire protocol (DESIGN.md, "One round" and "Roles over the network").

A drafter opens a session with `Hello` and gets `Welcome` (the target's limits) or an `ErrorReply`;
each round is one `VerifyRequest` answered by one `Verdict`; `Close` ends a session. The same
dataclasses are used in-process, so the codec is the only thing the network adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specexec.protocol.sampling import SamplingParams
from specexec.protocol.tree import DraftTree

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class Hello:
    session: str
    fingerprint: str  # tokenizer vocabulary hash (protocol.fingerprint)
    sampling: SamplingParams
    rule: str  # acceptance rule the drafter's trees are built for: specexec | specinfer
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Welcome:
    session: str
    vocab_size: int
    max_tree_nodes: int
    max_append: int  # longest `append` accepted in one request
    max_context: int  # committed + tree tokens the target's positions allow
    stop_ids: tuple[int, ...] = ()
    model: str = ""
    chat_template: str = ""  # the target's, for drafters that only have the draft's tokenizer
    forward_curve: tuple[tuple[int, float], ...] = ()  # (tokens, seconds) per verification forward
    offloaded: bool = False  # the target streams its weights every pass: a pass costs ~ the same for 1 or 128 tokens
    version: int = PROTOCOL_VERSION


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
    session: str = ""
    extra: dict = field(default_factory=dict)

    def tokens(self, tree: DraftTree) -> list[int]:
        """The emitted tokens: the accepted nodes' tokens, then the bonus."""
        return [int(tree.tokens[i]) for i in self.accepted] + [int(self.bonus)]


@dataclass(frozen=True)
class Close:
    session: str


# Error codes an ErrorReply may carry; a drafter reacts to some of them (see drafter.remote).
ERROR_CODES = (
    "bad_message",  # undecodable frame, wrong field type, unknown message type
    "bad_version",  # protocol version mismatch
    "bad_signature",  # HMAC missing, wrong or replayed
    "too_large",  # message or tree over the server's limits
    "fingerprint_mismatch",  # drafter and target tokenizers differ
    "unknown_session",  # no state for this session: re-open and re-send the committed sequence
    "stale_epoch",  # a Hello signed for another start of the verifier: sign it again with the reply's epoch
    "not_owner",  # the session belongs to another connection
    "bad_tree",  # tree breaks the contract (order, duplicates, ids, draft probabilities)
    "bad_request",  # well-formed message the session cannot accept (e.g. stale round)
    "over_capacity",  # session or cache limits reached
    "internal",  # the verifier failed; the message says why
)


@dataclass(frozen=True)
class ErrorReply:
    code: str
    message: str
    session: str = ""
    round: int = -1


Message = Hello | Welcome | VerifyRequest | Verdict | Close | ErrorReply
