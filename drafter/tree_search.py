"""Growing draft trees: SpecExec best-first search, and greedy chains.

One search object lives for a whole generation. Node 0 is the root (the last committed token);
every other node has a parent, a token, a depth and a score, the draft's cumulative
log-probability of its path (plus log(`depth_decay`) per level: 0 by default; the SpecExec
reference uses a decay of 0.95, which trades depth for width). Expanding a node runs the draft
on it (batched, tree-masked) and discovers its top `branch_width` children. A discovered node needs no draft forward to be sent:
the verifier only needs its token, so the tree's leaves are usually never expanded.

Best-first (DESIGN.md, "Growing the tree"): the round's tree is the `budget` best discovered
nodes. A node is expanded only while its children could still enter that set (its score beats
the budget-th best discovered score); each draft forward takes the best such nodes, up to
`max_n_beams` at once (a forward that wide costs about what a 1-node forward costs on a CPU,
see drafter/draft_profile.py) and at most a quarter of the budget (wider, the children of the
batch's best nodes push its worst ones out of the tree: wasted expansions). Growth stops when no unexpanded node can have a child in the
top `budget`: every undiscovered node scores below an unexpanded ancestor, so the tree is
exactly the top-`budget` set, closed under ancestors since a child never outscores its parent
(ties go to the earlier-discovered node). With one node per forward no expanded node ever
falls out of the tree; wider forwards waste a little (`expansions_per_node_sent` in the stats).

The tree persists across rounds: on the verdict, the new root's discovered subtree, expanded
or not, becomes the next round's tree with its draft KV kept (`reroot`), so only new nodes
cost a draft forward. Past the budget (`grow_beyond`, the overlap while the target verifies)
the search grows towards the likely verdicts, at most `overlap_extra` nodes per round. The
next root is always a node outside the sent tree whose parent is in it (the bonus token where
the target left the tree), and the work is only carried if that node was expanded. So each
such candidate c is weighed by its probability exp(score(c)) under the draft, and a node m
under it by score(c) + w * (score(m) - score(c)), `w = overlap_depth_weight` < 1: the likely
candidates' subtrees are grown several levels deep (as the next round's search would grow
them) before an unlikely candidate is opened. Unexpanded leaves of the sent tree rank by
their own score (their children are candidates).

Free nodes (`ngram`): the continuation of the last few committed tokens found earlier in the
prompt and the text so far (prompt lookup) is hung under the root as a chain, merged into the
existing branch where tokens coincide so siblings stay distinct. Each n-gram step scores
`ngram_logp` below its parent, so it competes for the budget like a draft child of probability
exp(ngram_logp); when the draft expands the parent and proposes the same token, the node keeps
the better of the two scores. The nodes cost no draft forward until they are expanded.

A greedy chain is a tree with `branch_width` 1. SpecInfer trees and sampled chains are not
grown here but in drafter/sampled_tree.py (fixed shapes, so the multi-draft rule stays exact);
drafter/search_api.py picks the search for a method. N-gram nodes are only added to SpecExec
trees (a chain is one branch).
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, replace

import torch

from specexec.drafter.draft_model import DraftModel
from specexec.drafter.ngram import PromptLookup
from specexec.drafter.tree_config import (BATCH_MARGIN, DEFAULT_BUDGET, LAST_ROUND_NODES_PER_TOKEN,  # noqa: F401
                                          METHODS, WASTE_DIVISOR, TreeConfig)
from specexec.protocol.sampling import SamplingParams
from specexec.protocol.tree import ROOT, DraftTree

@dataclass
class RoundTree:
    """What one round sends, plus which search node each wire index stands for and its score
    rank (0 = best): the budget-B tree is exactly the nodes ranked below B."""

    tree: DraftTree
    nodes: list[int]
    ranks: list[int]


class TreeSearch:
    def __init__(self, draft: DraftModel, config: TreeConfig, params: SamplingParams):
        if config.method == "specinfer" or (config.rule == "specinfer" and not params.greedy):
            raise ValueError(f"{config.method} trees at t={params.temperature} are sampled: "
                             "use drafter.search_api.make_search")
        self.draft = draft
        self.config = config
        self.params = params
        self.draft_temperature = params.temperature if params.temperature > 0 else 1.0
        self.lookup = PromptLookup(config.ngram_len)
        self.reused = 0  # nodes carried into this round by reroot
        self.expansions = 0  # nodes expanded by the draft so far (cumulative; stats take differences)
        self.depth_cap = config.max_depth  # deepest node this round's tree may hold
        self._overlap_done = 0
        self.behind: list[int] = []  # committed tokens the draft has not seen (the target ran alone)
        self._clear(0)

    # -- state --------------------------------------------------------------------------------

    def _clear(self, root_token: int) -> None:
        self.token, self.parent, self.score = [root_token], [ROOT], [0.0]
        self.depth, self.slot = [0], [ROOT]  # slot None: discovered, not expanded
        self.kids: list[list[int]] = [[]]
        self.child_of: dict[tuple[int, int], int] = {}
        self.frontier: list[tuple[float, int]] = []  # max-heap of expandable nodes (parent expanded)
        self.outlook: list[tuple[float, int]] | None = None  # the overlap's heap (grow_beyond), this round only
        self.anchor: dict[int, float] = {}  # score of each outlook node's first ancestor-or-self outside the tree
        self.sent: set[int] = set()  # the search nodes of the tree last sent
        self.top: list[float] = []  # min-heap of the best `budget` discovered scores within depth_cap

    def start(self, prompt: list[int]) -> None:
        """Prefill the committed sequence and discover the root's children."""
        self.draft.reset()
        root_logits = self.draft.extend(prompt)
        self.lookup.reset(list(prompt))
        self._clear(prompt[-1])
        self._discover([0], root_logits[None])

    def _add(self, parent: int, token: int, score: float) -> int:
        nid = len(self.token)
        self.token.append(token)
        self.parent.append(parent)
        self.score.append(score)
        self.depth.append(self.depth[parent] + 1)
        self.slot.append(None)
        self.kids.append([])
        self.kids[parent].append(nid)
        self.child_of[(parent, token)] = nid
        self._offer(nid)
        return nid

    def _offer(self, nid: int) -> None:
        """A node discovered or rescored: a candidate for expansion and for the tree."""
        if self.slot[self.parent[nid]] is not None:
            heapq.heappush(self.frontier, (-self.score[nid], nid))
            if self.outlook is not None:
                self._offer_outlook(nid)
        if self.depth[nid] <= self.depth_cap:
            s = self.score[nid]
            if len(self.top) < self.config.budget:
                heapq.heappush(self.top, s)
            elif s > self.top[0]:
                heapq.heapreplace(self.top, s)

    def _rebuild(self) -> None:
        """Both heaps from scratch: at each round's start, after the budget or depth cap changed."""
        nodes = range(1, len(self.token))
        self.frontier = [(-self.score[n], n) for n in nodes
                         if self.slot[n] is None and self.slot[self.parent[n]] is not None]
        heapq.heapify(self.frontier)
        inside = (self.score[n] for n in nodes if self.depth[n] <= self.depth_cap)
        self.top = heapq.nlargest(self.config.budget, inside)
        heapq.heapify(self.top)

    # -- growth -------------------------------------------------------------------------------

    def set_budget(self, budget: int) -> None:
        """Change the budget for the next rounds (`--budget auto`, the speed guard)."""
        self.config = replace(self.config, budget=budget)

    def limit_depth(self, cap: int) -> None:
        """This round's tree holds no node deeper than `cap` (the tokens still wanted, less the bonus)."""
        self.depth_cap = max(min(cap, self.config.max_depth), 1)

    def skip(self, tokens: list[int]) -> None:
        """The target decoded `tokens` without a tree: drop the tree, catch up at the next grow."""
        if not self.behind:
            self.draft.keep([], [])
        self.behind += tokens
        self.lookup.extend(tokens)
        self.reused = 0

    def _catch_up(self) -> None:
        root_logits = self.draft.extend(self.behind)
        self._clear(self.behind[-1])
        self.behind = []
        self._discover([0], root_logits[None])

    def grow(self, deadline: float | None = None) -> None:
        """Add the n-gram nodes, then expand until the top-`budget` tree is certain, or until
        `deadline` (a `time.perf_counter()` value): the tree is then the `budget` best nodes
        discovered so far, still closed under ancestors, only less certain to be the best."""
        self.outlook = None
        if self.behind:
            self._catch_up()
        if self.config.uses_ngram:
            self._hang_ngram()
        self._rebuild()
        while batch := self._pop(self.batch_width, certify=True):
            self._expand(batch)
            if deadline is not None and time.perf_counter() >= deadline:
                break

    @property
    def batch_width(self) -> int:
        """Nodes per draft forward: a quarter of the budget, at most `max_n_beams`. Wider batches
        expand nodes that the children of the batch's better nodes then push out of the tree."""
        return max(1, min(self.config.max_n_beams, self.config.budget // WASTE_DIVISOR))

    def grow_beyond(self) -> bool:
        """One more draft forward past the budget, in the same best-first order (the overlap).

        Counts only the nodes expanded after the round's tree was taken; returns False when
        the round's allowance (`overlap_extra`) is spent or there is nothing left to grow.
        """
        room = self.config.overlap_extra - self._overlap_done
        if room <= 0:
            return False
        if self.outlook is None:
            self._open_outlook()
        batch = self._pop_outlook(min(self.config.overlap_beams, room))
        if batch:
            self._expand(batch)
            self._overlap_done += len(batch)
        return bool(batch)

    def _open_outlook(self) -> None:
        """The overlap's heap over every expandable node, keyed towards the likely verdicts."""
        self.outlook, self.anchor = [], {}
        for n in range(1, len(self.token)):
            if self.slot[n] is None and self.slot[self.parent[n]] is not None:
                self._offer_outlook(n)

    def _offer_outlook(self, nid: int) -> None:
        parent = self.parent[nid]
        if nid in self.sent or parent == 0 or parent in self.sent:
            anchor = self.score[nid]  # a leaf of the tree, or a candidate next root
        else:
            anchor = self.anchor.get(parent)
            if anchor is None:  # an ancestor outside the tree, discovered before the outlook opened
                self._offer_outlook(parent)
                anchor = self.anchor[parent]
        self.anchor[nid] = anchor
        if self.slot[parent] is not None and self.depth[nid] < self.config.max_depth:
            key = anchor + self.config.overlap_depth_weight * (self.score[nid] - anchor)
            heapq.heappush(self.outlook, (-key, nid))

    def _pop_outlook(self, width: int) -> list[int]:
        batch = []
        while self.outlook and len(batch) < width:
            _, nid = heapq.heappop(self.outlook)
            if self.slot[nid] is None and nid not in batch:
                batch.append(nid)
        return batch

    def _pop(self, width: int, certify: bool) -> list[int]:
        """The best expandable nodes, up to `width`; with `certify`, only those whose children
        could still enter the top `budget`."""
        budget, batch = self.config.budget, []
        while self.frontier and len(batch) < width:
            neg, nid = self.frontier[0]
            if self.slot[nid] is not None or -neg != self.score[nid]:
                heapq.heappop(self.frontier)  # stale: expanded already, or rescored
                continue
            if certify and len(self.top) >= budget and -neg <= self.top[0]:
                break
            if certify and batch and -neg < self.score[batch[0]] - BATCH_MARGIN:
                break  # far below the batch's best: its children would likely push it out of the tree
            heapq.heappop(self.frontier)
            if self.depth[nid] < self.depth_cap:
                batch.append(nid)
        return batch

    def _expand(self, batch: list[int]) -> None:
        first = self.draft.n_slots
        logits = self.draft.expand([self.token[n] for n in batch], [self.slot[self.parent[n]] for n in batch])
        for i, nid in enumerate(batch):
            self.slot[nid] = first + i
        self.expansions += len(batch)
        for nid in batch:  # n-gram children hung before their parent was expanded: now expandable
            for kid in self.kids[nid]:
                heapq.heappush(self.frontier, (-self.score[kid], kid))
        self._discover(batch, logits)

    def _child(self, parent: int, token: int, score: float) -> None:
        """Discover (parent, token), or rescore an n-gram node the draft also proposes."""
        nid = self.child_of.get((parent, token))
        if nid is None:
            self._add(parent, token, score)
        elif score > self.score[nid]:
            if self.score[nid] in self.top:  # counted once, at its new score (rare: n-gram nodes only)
                self.top.remove(self.score[nid])
                heapq.heapify(self.top)
            self.score[nid] = score
            self._offer(nid)

    def _discover(self, nodes: list[int], logits: torch.Tensor) -> None:
        """Add the children of freshly expanded `nodes` as candidates."""
        logp = torch.log_softmax(logits.float() / self.draft_temperature, dim=-1)
        vals, ids = torch.topk(logp, min(self.config.width, logp.shape[-1]), dim=-1, sorted=True)
        vals, ids = vals.tolist(), ids.tolist()
        for row, nid in enumerate(nodes):
            if self.depth[nid] >= self.config.max_depth:
                continue
            base = self.score[nid] + self.level_logp
            for v, t in zip(vals[row], ids[row]):
                self._child(nid, t, base + v)

    @property
    def level_logp(self) -> float:
        """Added to every node's score per level below its parent: log(depth_decay), 0 by default."""
        return math.log(self.config.depth_decay)

    def _hang_ngram(self) -> None:
        """The prompt-lookup continuation as a chain under the root, merged where tokens coincide."""
        node = 0
        for token in self.lookup.propose(min(self.config.ngram_tokens, self.depth_cap)):
            nxt = self.child_of.get((node, token))
            step = self.config.ngram_logp + self.level_logp
            node = nxt if nxt is not None else self._add(node, token, self.score[node] + step)

    # -- the round's tree ----------------------------------------------------------------------

    def tree(self) -> RoundTree:
        """The `budget` best discovered nodes, parents first, in wire form."""
        self._overlap_done = 0
        inside = (n for n in range(1, len(self.token)) if self.depth[n] <= self.depth_cap)
        best = heapq.nsmallest(self.config.budget, inside, key=lambda n: (-self.score[n], n))
        rank = {n: r for r, n in enumerate(best)}
        nodes = sorted(best)
        self.sent, self.outlook = set(nodes), None
        ranks = [rank[n] for n in nodes]
        index = {n: i for i, n in enumerate(nodes)}
        index[0] = ROOT
        tokens = [self.token[n] for n in nodes]
        parents = [index[self.parent[n]] for n in nodes]
        return RoundTree(DraftTree.build(tokens, parents), nodes, ranks)

    # -- the next round -----------------------------------------------------------------------

    def reroot(self, sent: RoundTree | None, accepted: list[int], bonus: int) -> None:
        """Commit the accepted path and the bonus; the new root's subtree becomes the next tree."""
        path = [sent.nodes[i] for i in accepted] if sent else []
        self.lookup.extend([self.token[n] for n in path] + [bonus])
        new_root = self.child_of.get((path[-1] if path else 0, bonus))
        if new_root is not None:
            path.append(new_root)
        slotted = [n for n in path if self.slot[n] is not None]
        assert slotted == path[: len(slotted)], "expanded nodes always have expanded ancestors"
        if new_root is not None and self.slot[new_root] is not None:
            self._carry_subtree(new_root, [self.slot[n] for n in slotted])
            return
        self.reused = 0
        self.draft.keep([self.slot[n] for n in slotted], [])
        tail = [self.token[n] for n in path[len(slotted):]]
        if new_root is None:
            tail.append(bonus)
        root_logits = self.draft.extend(tail)
        self._clear(bonus)
        self._discover([0], root_logits[None])

    def _carry_subtree(self, root: int, path_slots: list[int]) -> None:
        """Keep every node under `root`, expanded or not, renumbered in discovery order."""
        old, stack = [], [root]
        while stack:
            n = stack.pop()
            old.append(n)
            stack.extend(self.kids[n])
        old.sort()
        tree_slots = [self.slot[n] for n in old if n != root and self.slot[n] is not None]
        self.draft.keep(path_slots, tree_slots)
        new_slot = {s: i for i, s in enumerate(sorted(tree_slots))}
        token, parent, score, depth, slot = self.token, self.parent, self.score, self.depth, self.slot
        self._clear(token[root])
        renum = {root: 0}
        base, base_depth = score[root], depth[root]
        for n in old[1:]:
            nid = len(self.token)
            renum[n] = nid
            p = renum[parent[n]]
            self.token.append(token[n])
            self.parent.append(p)
            self.score.append(score[n] - base)
            self.depth.append(depth[n] - base_depth)
            self.slot.append(None if slot[n] is None else new_slot[slot[n]])
            self.kids.append([])
            self.kids[p].append(nid)
            self.child_of[(p, token[n])] = nid
        self.reused = len(self.token) - 1
