"""What the session needs from a draft search, and which search each method uses.

SpecExec's best-first search (`tree_search.TreeSearch`) builds SpecExec trees, and greedy chains
(its best-first search at width 1 is the draft's argmax chain). SpecInfer trees, at every
temperature, and sampled chains come from `sampled_tree.SampledTree`, whose fixed shapes keep the
multi-draft acceptance exact.
"""

from __future__ import annotations

from typing import Protocol

from specexec.drafter.draft_model import DraftModel
from specexec.drafter.sampled_tree import SampledTree
from specexec.drafter.tree_config import TreeConfig
from specexec.drafter.tree_search import RoundTree, TreeSearch
from specexec.protocol.sampling import SamplingParams


class DraftSearch(Protocol):
    draft: DraftModel  # its `forwards` counter gives the round's draft forwards
    config: TreeConfig  # `budget` is the size the next tree is grown to
    reused: int  # nodes carried into this round by the last reroot
    expansions: int  # nodes run through the draft so far (cumulative)

    def start(self, prompt: list[int]) -> None: ...

    def set_budget(self, budget: int) -> None: ...

    def limit_depth(self, cap: int) -> None: ...

    def skip(self, tokens: list[int]) -> None: ...

    def grow(self, deadline: float | None = None) -> None: ...

    def grow_beyond(self) -> bool: ...

    def tree(self) -> RoundTree: ...

    def reroot(self, sent: RoundTree, accepted: list[int], bonus: int) -> None: ...


def make_search(draft: DraftModel, config: TreeConfig, params: SamplingParams) -> DraftSearch:
    """The search for `config.method` (not "autoregressive", which drafts nothing)."""
    if config.method == "autoregressive":
        raise ValueError("autoregressive decoding has no draft search")
    draft.repetition_penalty = params.repetition_penalty  # the draft proposes what the penalized target emits
    if config.method == "specinfer" or (config.method == "chain" and not params.greedy):
        return SampledTree(draft, config, params)
    return TreeSearch(draft, config, params)
