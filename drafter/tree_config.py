"""The shape of the draft trees a method grows: the one home of the tree defaults.

Kept free of torch and of the draft model so that the command line can read the defaults
without loading the drafter's code.
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("specexec", "specinfer", "chain", "autoregressive")
DEFAULT_BUDGET = 16  # nodes per tree: the one default the CLI, bench and API read


@dataclass(frozen=True)
class TreeConfig:
    method: str = "specexec"
    budget: int = DEFAULT_BUDGET
    max_n_beams: int = 64  # nodes expanded per draft forward
    branch_width: int = 16  # children discovered per expanded node
    max_depth: int = 32
    q_support: int = 64  # size of the truncated draft distribution for sampled children
    overlap_beams: int = 4  # nodes per draft forward while growing past the budget (small: stop soon)
    overlap_extra: int = 128  # nodes expanded past the budget per round, at most

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method != "autoregressive" and self.budget < 1:
            raise ValueError(f"budget must be at least 1 for {self.method}, got {self.budget}")
        for name in ("max_n_beams", "branch_width", "max_depth", "q_support", "overlap_beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def rule(self) -> str:
        """The acceptance rule this method's trees are built for."""
        return "specexec" if self.method in ("specexec", "autoregressive") else "specinfer"

    @property
    def width(self) -> int:
        return 1 if self.method == "chain" else self.branch_width
