"""The shape of the draft trees a method grows: the one home of the tree defaults.

Kept free of torch and of the draft model so that the command line can read the defaults
without loading the drafter's code.
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("specexec", "specinfer", "chain", "autoregressive")
DEFAULT_BUDGET = 16  # nodes per tree: the one default the CLI, bench and API read
# ... unless the target streams its weights every pass (an offloaded target), where a pass costs
# about the same for 1 or 128 tokens and the draft grows 128 nodes in a fraction of one pass
# (docs/results.md, the offloaded regime: 3.72x at 16, 4.46x at 128 in one run on four chat prompts).
OFFLOADED_BUDGET = 128
DEFAULT_MAX_NEW_TOKENS = 256  # tokens one generation makes at most, unless told (CLI, API, RunOptions)
DEFAULT_BEAMS = 16  # draft forward width: near a 1-node forward's cost on a 2-core CPU (draft_profile)
WASTE_DIVISOR = 4  # a forward expands at most budget / this many nodes (forwards cost ~flat in width: fewer forwards win)
BATCH_MARGIN = 2.0  # nats: a forward's nodes score within this of its best one (a confident chain goes alone)
LAST_ROUND_NODES_PER_TOKEN = 8  # the last rounds' budget cap, per token still wanted before the bonus
# With overlap, drafting after a verdict stops at this share of the last pass's time, and the tree
# sent is the best found by then: the rest was grown while the target verified (the carried tree).
# A streaming verifier reads its first layers in that time anyway (docs/architecture.md).
AFTER_VERDICT_SHARE = 0.1


@dataclass(frozen=True)
class TreeConfig:
    method: str = "specexec"
    budget: int = DEFAULT_BUDGET
    max_n_beams: int = DEFAULT_BEAMS  # nodes expanded per draft forward, at most
    branch_width: int = 16  # children discovered per expanded node
    max_depth: int = 32
    depth_decay: float = 1.0  # each tree level multiplies a node's score by this (the reference's decay_factor)
    q_support: int = 64  # size of the truncated draft distribution for sampled children
    overlap_beams: int = 16  # nodes per draft forward past the budget (a verdict waits for one at most)
    overlap_extra: int = 512  # nodes expanded past the budget per round, at most
    overlap_depth_weight: float = 0.3  # past the budget: depth under a likely next root vs opening another
    ngram: bool = False  # prompt-lookup nodes (free: no draft forward until expanded); off: see report
    ngram_len: int = 3  # longest suffix of the committed text looked up earlier in it
    ngram_tokens: int = 8  # tokens of the found continuation hung under the root
    ngram_logp: float = -0.7  # score of each n-gram step below its parent (as a child of p ~ 0.5)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method != "autoregressive" and self.budget < 1:
            raise ValueError(f"budget must be at least 1 for {self.method}, got {self.budget}")
        if not 0.0 < self.depth_decay <= 1.0:
            raise ValueError(f"depth_decay must be in (0, 1], got {self.depth_decay}")
        for name in ("max_n_beams", "branch_width", "max_depth", "q_support", "overlap_beams", "ngram_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def rule(self) -> str:
        """The acceptance rule this method's trees are built for."""
        return "specexec" if self.method in ("specexec", "autoregressive") else "specinfer"

    @property
    def width(self) -> int:
        return 1 if self.method == "chain" else self.branch_width

    @property
    def uses_ngram(self) -> bool:
        return self.ngram and self.method == "specexec" and self.ngram_tokens > 0 and self.width > 1
