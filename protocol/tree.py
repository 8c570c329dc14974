"""The draft tree as both sides see it: tokens, parents, depths, validation, attention.

Node i carries `tokens[i]`; its parent is `parents[i] < i`, or -1 for "child of the root", the
last committed token. Parents before children (topological order) makes the ancestor relation
one pass over the nodes; siblings carry distinct tokens, which the acceptance walk relies on.

For the SpecInfer rule a tree also carries the draft distribution each node's children were
sampled from, as `q_ids`/`q_probs` rows (row 0 for the root, row i+1 for node i; zero-probability
slots are padding). The SpecExec rule needs no draft probabilities at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

ROOT = -1


class TreeError(ValueError):
    """A tree that breaks the wire contract; the message names the offending node."""


@dataclass(frozen=True)
class DraftTree:
    tokens: np.ndarray  # int32 [N]
    parents: np.ndarray  # int32 [N], parents[i] < i, ROOT for children of the root
    q_ids: np.ndarray | None = None  # int32 [N+1, K] draft support per node (row 0 = root)
    q_probs: np.ndarray | None = None  # float32 [N+1, K] draft probabilities on that support
    _children: list = field(default=None, init=False, repr=False, compare=False)

    @staticmethod
    def build(tokens, parents, q_ids=None, q_probs=None) -> "DraftTree":
        return DraftTree(
            np.asarray(tokens, dtype=np.int32).reshape(-1),
            np.asarray(parents, dtype=np.int32).reshape(-1),
            None if q_ids is None else np.asarray(q_ids, dtype=np.int32),
            None if q_probs is None else np.asarray(q_probs, dtype=np.float32),
        )

    @staticmethod
    def empty() -> "DraftTree":
        return DraftTree.build([], [])

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def has_draft_probs(self) -> bool:
        return self.q_ids is not None

    def validate(self, vocab_size: int) -> None:
        """Raise TreeError naming the first node that breaks the contract."""
        n = len(self)
        if self.tokens.ndim != 1 or self.parents.shape != self.tokens.shape:
            raise TreeError(f"tokens ({self.tokens.shape}) and parents ({self.parents.shape}) "
                            "must be 1-D arrays of the same length")
        bad = np.nonzero((self.tokens < 0) | (self.tokens >= vocab_size))[0]
        if bad.size:
            i = int(bad[0])
            raise TreeError(f"node {i}: token id {int(self.tokens[i])} out of range [0, {vocab_size})")
        bad = np.nonzero((self.parents < ROOT) | (self.parents >= np.arange(n)))[0]
        if bad.size:
            i = int(bad[0])
            raise TreeError(f"node {i}: parent {int(self.parents[i])} is not an earlier node or -1 "
                            "(the tree must be topologically ordered)")
        pairs = self.parents.astype(np.int64) * (vocab_size + 1) + self.tokens
        uniq, first = np.unique(pairs, return_index=True)
        if uniq.size != n:
            dup = sorted(set(range(n)) - set(first.tolist()))[0]
            raise TreeError(f"node {dup}: token {int(self.tokens[dup])} duplicates a sibling "
                            f"under parent {int(self.parents[dup])}")
        if (self.q_ids is None) != (self.q_probs is None):
            raise TreeError("q_ids and q_probs must be sent together")
        if self.q_ids is not None:
            if self.q_ids.ndim != 2 or self.q_ids.shape[0] != n + 1 or self.q_probs.shape != self.q_ids.shape:
                raise TreeError(f"draft distributions must be [{n + 1}, K] arrays, got "
                                f"{self.q_ids.shape} and {self.q_probs.shape}")
            if ((self.q_ids < 0) | (self.q_ids >= vocab_size)).any():
                raise TreeError("draft distribution holds a token id out of range")
            if not np.isfinite(self.q_probs).all() or (self.q_probs < 0).any():
                raise TreeError("draft probabilities must be finite and non-negative")
            rows = self.parents.astype(np.int64) + 1
            carried = ((self.q_ids[rows] == self.tokens[:, None]) & (self.q_probs[rows] > 0)).any(axis=1)
            if n and not carried.all():
                i = int(np.nonzero(~carried)[0][0])
                raise TreeError(f"node {i}: token {int(self.tokens[i])} has no draft probability "
                                "under its parent (children must be sampled from the sent q)")

    def depths(self) -> np.ndarray:
        """Depth of each node; children of the root have depth 1."""
        depth = np.zeros(len(self), dtype=np.int64)
        for i, p in enumerate(self.parents.tolist()):
            depth[i] = 1 if p == ROOT else depth[p] + 1
        return depth

    def children(self, node: int) -> list[int]:
        """Children of `node` (ROOT for the root) in index order."""
        if self._children is None:
            table: dict[int, list[int]] = {}
            for i, p in enumerate(self.parents.tolist()):
                table.setdefault(p, []).append(i)
            object.__setattr__(self, "_children", table)
        return self._children.get(node, [])

    def child_with_token(self, node: int, token: int) -> int | None:
        for c in self.children(node):
            if int(self.tokens[c]) == token:
                return c
        return None

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node` inclusive."""
        path = []
        while node != ROOT:
            path.append(node)
            node = int(self.parents[node])
        return path[::-1]

    def draft_distribution(self, node: int, vocab_size: int) -> torch.Tensor:
        """Dense draft distribution the children of `node` were sampled from."""
        q = torch.zeros(vocab_size, dtype=torch.float64)
        row = node + 1
        q.index_add_(0, torch.from_numpy(self.q_ids[row].astype(np.int64)),
                     torch.from_numpy(self.q_probs[row].astype(np.float64)))
        return q


def ancestor_matrix(parents: np.ndarray) -> torch.Tensor:
    """Bool [N, N]: entry (i, j) is True when node j is node i or one of its ancestors."""
    n = len(parents)
    seen = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents.tolist()):
        if p != ROOT:
            seen[i] = seen[p]
        seen[i, i] = True
    return seen


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a bool [q, kv] visibility matrix into the [1, 1, q, kv] additive float mask."""
    mask = torch.zeros(visible.shape, dtype=dtype)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def verify_mask(past_len: int, n_append: int, parents: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Mask for one verification forward over `append + tree` on top of `past_len` cached tokens.

    Appended tokens are causal; each tree node sees the whole prefix, its ancestors and itself.
    """
    n = len(parents)
    prefix = past_len + n_append
    visible = torch.zeros(n_append + n, prefix + n, dtype=torch.bool)
    visible[:n_append, :prefix] = torch.ones(n_append, prefix, dtype=torch.bool).tril(past_len)
    visible[n_append:, :prefix] = True
    visible[n_append:, prefix:] = ancestor_matrix(parents)
    return additive_mask(visible, dtype)


def verify_positions(past_len: int, n_append: int, depths: np.ndarray) -> torch.Tensor:
    """Position ids [1, A+N]: consecutive over the appended tokens, depth-based in the tree."""
    append = torch.arange(past_len, past_len + n_append)
    root_pos = past_len + n_append - 1
    tree = torch.from_numpy(np.asarray(depths, dtype=np.int64)) + root_pos
    return torch.cat([append, tree])[None]
