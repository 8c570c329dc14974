"""Growing draft trees: SpecExec best-first search, SpecInfer sampled trees, chains.

One search object lives for a whole generation. Node 0 is the root (the last committed token);
every other node has a parent, a token, a depth and a score, the draft's cumulative
log-probability of its path. Expanding a node runs the draft on it (batched, tree-masked) and
discovers its top `branch_width` children as candidates.

Best-first (DESIGN.md, "Growing the tree"): pop the best candidates, up to `max_n_beams` per
draft forward, while they can still enter the top `budget`; stop when the tree holds `budget`
nodes and no candidate can. All selected nodes are expanded, so every undiscovered node scores
below some candidate, and the final tree -- the `budget` best selected nodes -- is exactly the
top-`budget` set. It is closed under ancestors since a child never outscores its parent (ties
go to the earlier-discovered node).

Past the budget (`grow_beyond`, the overlap) the same queue keeps being expanded in the same
order, and `reroot` carries the new root's subtree and its draft KV into the next round.

SpecInfer trees use the same machinery with children *sampled* without replacement from the
draft distribution q (truncated to its top `q_support` tokens and renormalised, which is then
exactly the proposal the acceptance rule is given); sibling scores are clamped to decrease in
sampling order so the kept siblings are always the first ones sampled. A chain is a tree with
`branch_width` 1.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

import numpy as np
import torch

from specexec.drafter.draft_model import DraftModel
from specexec.protocol.sampling import SamplingParams
from specexec.protocol.tree import ROOT, DraftTree

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


@dataclass
class RoundTree:
    """What one round sends, plus which search node each wire index stands for and its score
    rank (0 = best): the budget-B tree is exactly the nodes ranked below B."""

    tree: DraftTree
    nodes: list[int]
    ranks: list[int]


class TreeSearch:
    def __init__(self, draft: DraftModel, config: TreeConfig, params: SamplingParams):
        self.draft = draft
        self.config = config
        self.params = params
        self.sampled = config.rule == "specinfer" and not params.greedy
        self.draft_temperature = params.temperature if params.temperature > 0 else 1.0
        self.rng = torch.Generator().manual_seed(params.seed)
        self.reused = 0  # nodes carried into a round by reroot, for the overlap hit statistic
        self.expansions = 0  # nodes expanded by the draft so far (cumulative; stats take differences)
        self._clear(0)

    # -- state --------------------------------------------------------------------------------

    def _clear(self, root_token: int) -> None:
        self.token, self.parent, self.score = [root_token], [ROOT], [0.0]
        self.depth, self.slot = [0], [ROOT]
        self.q: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.child_of: dict[tuple[int, int], int] = {}
        self.candidates: list[tuple[float, int]] = []
        self.selected: list[int] = []
        self.top: list[float] = []  # min-heap of the best `budget` selected scores

    def start(self, prompt: list[int]) -> None:
        """Prefill the committed sequence and discover the root's children."""
        self.draft.reset()
        root_logits = self.draft.extend(prompt)
        self._clear(prompt[-1])
        self._discover([0], root_logits[None])

    def _add(self, parent: int, token: int, score: float) -> int:
        nid = len(self.token)
        self.token.append(token)
        self.parent.append(parent)
        self.score.append(score)
        self.depth.append(self.depth[parent] + 1)
        self.slot.append(None)
        self.child_of[(parent, token)] = nid
        heapq.heappush(self.candidates, (-score, nid))
        return nid

    # -- growth -------------------------------------------------------------------------------

    def set_budget(self, budget: int) -> None:
        """Change the budget for the next rounds (`--budget auto` after its warm-up)."""
        self.config = replace(self.config, budget=budget)
        self.top = heapq.nlargest(budget, (self.score[n] for n in self.selected))
        heapq.heapify(self.top)

    def grow(self) -> None:
        """Expand until the top-`budget` tree is certain."""
        while batch := self._pop(certify=True):
            self._expand(batch)

    def grow_beyond(self) -> bool:
        """One more draft forward past the budget, in the same best-first order (the overlap).

        Returns False when there is nothing left to grow.
        """
        if self.draft.n_slots >= self.config.budget + self.config.overlap_extra:
            return False
        batch = self._pop(certify=False, limit=self.config.overlap_beams)
        if batch:
            self._expand(batch)
        return bool(batch)

    def _pop(self, certify: bool, limit: int | None = None) -> list[int]:
        budget, batch, limit = self.config.budget, [], limit or self.config.max_n_beams
        while self.candidates and len(batch) < limit:
            neg, nid = self.candidates[0]
            if certify and len(self.top) >= budget and -neg <= self.top[0]:
                break
            heapq.heappop(self.candidates)
            self.selected.append(nid)
            if len(self.top) < budget:
                heapq.heappush(self.top, -neg)
            elif -neg > self.top[0]:
                heapq.heapreplace(self.top, -neg)
            if self.depth[nid] < self.config.max_depth:
                batch.append(nid)
        return batch

    def _expand(self, batch: list[int]) -> None:
        first = self.draft.n_slots
        logits = self.draft.expand([self.token[n] for n in batch], [self.slot[self.parent[n]] for n in batch])
        for i, nid in enumerate(batch):
            self.slot[nid] = first + i
        self.expansions += len(batch)
        self._discover(batch, logits)

    def _discover(self, nodes: list[int], logits: torch.Tensor) -> None:
        """Add the children of freshly expanded `nodes` as candidates."""
        if self.sampled:
            return self._discover_sampled(nodes, logits)
        logp = torch.log_softmax(logits.float() / self.draft_temperature, dim=-1)
        vals, ids = torch.topk(logp, min(self.config.width, logp.shape[-1]), dim=-1, sorted=True)
        vals, ids = vals.tolist(), ids.tolist()
        for row, nid in enumerate(nodes):
            if self.depth[nid] >= self.config.max_depth:
                continue
            base = self.score[nid]
            for v, t in zip(vals[row], ids[row]):
                self._add(nid, t, base + v)

    def _discover_sampled(self, nodes: list[int], logits: torch.Tensor) -> None:
        probs = torch.softmax(logits.float() / self.draft_temperature, dim=-1)
        q_vals, q_ids = torch.topk(probs, min(self.config.q_support, probs.shape[-1]), dim=-1)
        q_vals = q_vals / q_vals.sum(-1, keepdim=True)
        k = min(self.config.width, q_vals.shape[-1])
        gumbel = -torch.log(-torch.log(torch.rand(q_vals.shape, generator=self.rng).clamp_min(1e-20)))
        perturbed = torch.log(q_vals.clamp_min(1e-30)) + gumbel
        perturbed[q_vals <= 0] = -float("inf")
        order = torch.topk(perturbed, k, dim=-1, sorted=True).indices  # without replacement
        for row, nid in enumerate(nodes):
            self.q[nid] = (q_ids[row].numpy().astype(np.int32), q_vals[row].numpy().astype(np.float32))
            if self.depth[nid] >= self.config.max_depth:
                continue
            base, prev = self.score[nid], self.score[nid]
            for j in order[row].tolist():
                if q_vals[row, j] <= 0:
                    break
                prev = min(prev, base + float(torch.log(q_vals[row, j])))
                self._add(nid, int(q_ids[row, j]), prev)

    # -- the round's tree ----------------------------------------------------------------------

    def tree(self) -> RoundTree:
        """The `budget` best selected nodes, parents first, in wire form."""
        best = sorted(self.selected, key=lambda n: (-self.score[n], n))[: self.config.budget]
        rank = {n: r for r, n in enumerate(best)}
        nodes = sorted(best)
        ranks = [rank[n] for n in nodes]
        index = {n: i for i, n in enumerate(nodes)}
        index[0] = ROOT
        tokens = [self.token[n] for n in nodes]
        parents = [index[self.parent[n]] for n in nodes]
        if not self.sampled:
            return RoundTree(DraftTree.build(tokens, parents), nodes, ranks)
        width = self.config.q_support
        q_ids = np.zeros((len(nodes) + 1, width), dtype=np.int32)
        q_probs = np.zeros((len(nodes) + 1, width), dtype=np.float32)
        for row, n in enumerate([0] + nodes):
            if n in self.q:
                ids, probs = self.q[n]
                q_ids[row, : len(ids)], q_probs[row, : len(ids)] = ids, probs
        return RoundTree(DraftTree.build(tokens, parents, q_ids, q_probs), nodes, ranks)

    # -- the next round -----------------------------------------------------------------------

    def reroot(self, sent: RoundTree, accepted: list[int], bonus: int) -> None:
        """Commit the accepted path and the bonus; keep the new root's subtree when it was grown."""
        self.reused = 0
        path = [sent.nodes[i] for i in accepted]
        new_root = self.child_of.get((path[-1] if path else 0, bonus))
        if new_root is not None:
            path.append(new_root)
        slotted = [n for n in path if self.slot[n] is not None]
        assert slotted == path[: len(slotted)], "expanded nodes always have expanded ancestors"
        if new_root is not None and self.slot[new_root] is not None:
            self._carry_subtree(new_root, [self.slot[n] for n in slotted])
            return
        self.draft.keep([self.slot[n] for n in slotted], [])
        tail = [self.token[n] for n in path[len(slotted):]]
        if new_root is None:
            tail.append(bonus)
        root_logits = self.draft.extend(tail)
        self._clear(bonus)
        self._discover([0], root_logits[None])

    def _carry_subtree(self, root: int, path_slots: list[int]) -> None:
        inside = {root}
        for n in range(root + 1, len(self.token)):
            if self.parent[n] in inside:
                inside.add(n)
        old = sorted(inside)
        tree_slots = [self.slot[n] for n in old if n != root and self.slot[n] is not None]
        self.draft.keep(path_slots, tree_slots)
        new_slot = {s: i for i, s in enumerate(sorted(tree_slots))}
        token, parent, score, depth, slot, q = self.token, self.parent, self.score, self.depth, self.slot, self.q
        self._clear(token[root])
        renum = {root: 0}
        if root in q:
            self.q[0] = q[root]
        base, base_depth = score[root], depth[root]
        for n in old[1:]:
            nid = len(self.token)
            renum[n] = nid
            self.token.append(token[n])
            self.parent.append(renum[parent[n]])
            self.score.append(score[n] - base)
            self.depth.append(depth[n] - base_depth)
            self.slot.append(None if slot[n] is None else new_slot[slot[n]])
            self.child_of[(self.parent[nid], token[n])] = nid
            if n in q:
                self.q[nid] = q[n]
            if self.slot[nid] is None:
                heapq.heappush(self.candidates, (-self.score[nid], nid))
            else:
                self.selected.append(nid)
                heapq.heappush(self.top, self.score[nid])
        while len(self.top) > self.config.budget:
            heapq.heappop(self.top)
        self.reused = len(self.token) - 1
