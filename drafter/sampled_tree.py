"""SpecInfer's draft tree: k independently sampled chains of depth d, fixed in shape before sampling.

The root's k children are drawn from the draft distribution q *without replacement* (Gumbel
top-k, kept in sampling order); below each, the chain continues with one draw from q per level,
independently of every other chain. This is the SpecExec reference's SpecInfer baseline ("n_beams
sequences from the root, with no subsequent branching") and exactly the proposal the multi-draft
rule in verifier/acceptance.py is exact for: at the root it tries the children in sampling order
with q losing each rejected one; at a chain node it sees one draw from q.

Lossless by construction: the shape (k chains x depth d) is chosen from the config alone, before
any token is drawn, so nothing is kept or dropped because of which tokens came out (a budget that
trims sampled siblings by their own probability biases the output). The budget only chooses the
shape: all `branch_width` chains that fit, each as deep as `max_depth` and the budget allow, so
k x d <= budget. A chain (method "chain") is the same with k = 1.

q is the draft's softmax at the sampling temperature, truncated to its top `q_support` tokens and
renormalised; it is sent with the tree. At temperature 0 the chains are sampled at temperature 1,
as the reference does: the target then only follows its argmax, which is exact for any tree, so
the greedy output is the target's greedy output whatever was drawn; q is not sent.

The tree is rebuilt every round: the bonus token is never a node of the sent tree (it is drawn
from the residual where every child was rejected, or below a leaf), so nothing can be carried
over (`reused` stays 0) and there is nothing useful to grow past the budget (`grow_beyond`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from specexec.drafter.draft_model import DraftModel
from specexec.drafter.tree_search import RoundTree, TreeConfig
from specexec.protocol.sampling import SamplingParams
from specexec.protocol.tree import ROOT, DraftTree


def shape(config: TreeConfig) -> tuple[int, int]:
    """(chains, depth) for the config's budget: chains x depth <= budget."""
    chains = min(config.width, config.budget)
    return chains, min(config.max_depth, config.budget // chains)


@dataclass
class _Proposal:
    """One draft distribution: the top `q_support` ids and their renormalised probabilities."""

    ids: torch.Tensor  # int64 [K]
    probs: torch.Tensor  # float32 [K]


class SampledTree:
    """Grows SpecInfer trees (and sampled chains) for one generation; the session's search."""

    def __init__(self, draft: DraftModel, config: TreeConfig, params: SamplingParams):
        self.draft = draft
        self.config = config
        self.params = params
        self.temperature = params.temperature if params.temperature > 0 else 1.0
        self.rng = torch.Generator().manual_seed(params.seed)
        self.reused = 0  # always 0: a sampled tree is never carried into the next round
        self.expansions = 0  # nodes run through the draft so far (cumulative; stats take differences)
        self.depth_cap = config.max_depth  # this round's deepest chain (the tokens still wanted)
        self._root_logits: torch.Tensor | None = None
        self._clear()

    def _clear(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []  # wire indices, ROOT for the root's children
        self.slots: list[int | None] = []  # draft cache slot of each expanded node
        self.proposals: dict[int, _Proposal] = {}  # node (ROOT for the root) -> q its children came from
        self.grown = False

    # -- the session's interface ---------------------------------------------------------------

    def start(self, prompt: list[int]) -> None:
        """Prefill the committed sequence; the first tree grows from its last token."""
        self.draft.reset()
        self._root_logits = self.draft.extend(prompt)
        self._clear()

    def set_budget(self, budget: int) -> None:
        """Change the budget for the next trees (it chooses their shape)."""
        self.config = replace(self.config, budget=budget)

    def limit_depth(self, cap: int) -> None:
        """This round's chains are at most `cap` long (the tokens still wanted, less the bonus)."""
        self.depth_cap = max(min(cap, self.config.max_depth), 1)

    def skip(self, tokens: list[int]) -> None:
        """The target decoded `tokens` without a tree: the next tree grows after them."""
        self._root_logits = self.draft.extend(tokens)
        self._clear()

    def grow(self, deadline: float | None = None) -> None:
        """Sample this round's chains, one draft forward per level below the root's children.
        The shape is fixed before sampling (that keeps the multi-draft rule exact): no deadline."""
        if self.grown:
            return
        chains, depth = shape(self.config)
        depth = min(depth, self.depth_cap)
        level = self._sample_roots(chains)
        for _ in range(depth - 1):
            logits = self._expand(level)
            level = [self._add(node, self._draw(self._proposal(node, row))) for node, row in zip(level, logits)]
        self.grown = True

    def grow_beyond(self) -> bool:
        """Nothing past the budget is ever reused (see the module's docstring)."""
        return False

    def tree(self) -> RoundTree:
        """The round's tree in wire form. Nodes are numbered level by level, chains in sampling order,
        and ranked by that number: the shape of a smaller budget B is the nodes ranked below B when
        B < k or k divides B (otherwise it drops the last partial level), which is what
        `--budget auto`'s warm-up assumes."""
        nodes = list(range(len(self.tokens)))
        if self.params.greedy:
            return RoundTree(DraftTree.build(self.tokens, self.parents), nodes, nodes)
        width = min(self.config.q_support, self.draft.vocab_size)
        q_ids = np.zeros((len(nodes) + 1, width), dtype=np.int32)
        q_probs = np.zeros((len(nodes) + 1, width), dtype=np.float32)
        for node, q in self.proposals.items():
            q_ids[node + 1, : len(q.ids)] = q.ids.numpy()
            q_probs[node + 1, : len(q.ids)] = q.probs.numpy()
        return RoundTree(DraftTree.build(self.tokens, self.parents, q_ids, q_probs), nodes, nodes)

    def reroot(self, sent: RoundTree, accepted: list[int], bonus: int) -> None:
        """Commit the accepted path and the bonus; the next tree grows from the bonus."""
        slotted = [self.slots[n] for n in accepted if self.slots[n] is not None]
        self.draft.keep(slotted, [])
        tail = [self.tokens[n] for n in accepted[len(slotted):]] + [bonus]
        self._root_logits = self.draft.extend(tail)
        self._clear()

    # -- sampling ------------------------------------------------------------------------------

    def _proposal(self, node: int, logits: torch.Tensor) -> _Proposal:
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        vals, ids = torch.topk(probs, min(self.config.q_support, probs.shape[-1]))
        q = _Proposal(ids, vals / vals.sum())
        self.proposals[node] = q
        return q

    def _sample_roots(self, chains: int) -> list[int]:
        """The root's children: `chains` distinct tokens from q in sampling order (Gumbel top-k)."""
        q = self._proposal(ROOT, self._root_logits)
        gumbel = -torch.log(-torch.log(torch.rand(q.probs.shape, generator=self.rng).clamp_min(1e-20)))
        keys = torch.log(q.probs) + gumbel  # log 0 = -inf: never drawn
        order = torch.topk(keys, min(chains, len(keys))).indices.tolist()
        return [self._add(ROOT, int(q.ids[j])) for j in order if q.probs[j] > 0]

    def _draw(self, q: _Proposal) -> int:
        return int(q.ids[torch.multinomial(q.probs, 1, generator=self.rng)])

    def _add(self, parent: int, token: int) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.slots.append(None)
        return len(self.tokens) - 1

    def _expand(self, nodes: list[int]) -> torch.Tensor:
        """Run the draft on `nodes` (whose parents are expanded); logits [len(nodes), V]."""
        first = self.draft.n_slots
        parent_slots = [ROOT if self.parents[n] == ROOT else self.slots[self.parents[n]] for n in nodes]
        logits = self.draft.expand([self.tokens[n] for n in nodes], parent_slots)
        self.expansions += len(nodes)
        for i, n in enumerate(nodes):
            self.slots[n] = first + i
        return logits
