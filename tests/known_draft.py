"""A draft whose probabilities are a known function of the path, for testing tree search."""

from __future__ import annotations

import hashlib
import heapq
import math

import torch

from specexec.protocol.tree import ROOT


def known_logits(context: list[int], vocab: int) -> torch.Tensor:
    """Deterministic logits for a context (depends on the last 3 tokens and the length)."""
    key = hashlib.blake2b(repr((context[-3:], len(context))).encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(key, "little"))
    return torch.randn(vocab, generator=gen) * 2.5


class KnownDraft:
    """Implements the DraftModel interface the search uses, without a network."""

    def __init__(self, vocab: int = 24):
        self.vocab_size = vocab
        self.forwards = 0
        self.batches: list[int] = []
        self.reset()

    def reset(self):
        self.seq: list[int] = []
        self.slot_paths: list[list[int]] = []

    @property
    def committed(self):
        return len(self.seq)

    @property
    def n_slots(self):
        return len(self.slot_paths)

    def extend(self, tokens):
        assert not self.slot_paths
        self.seq += list(tokens)
        self.forwards += 1
        return known_logits(self.seq, self.vocab_size)

    def expand(self, tokens, parent_slots):
        self.forwards += 1
        self.batches.append(len(tokens))
        out = []
        for t, p in zip(tokens, parent_slots):
            path = ([] if p == ROOT else self.slot_paths[p]) + [t]
            self.slot_paths.append(path)
            out.append(known_logits(self.seq + path, self.vocab_size))
        return torch.stack(out)

    def keep(self, path_slots, tree_slots):
        if path_slots:
            self.seq += self.slot_paths[path_slots[-1]]
        cut = len(self.slot_paths[path_slots[-1]]) if path_slots else 0
        self.slot_paths = [self.slot_paths[s][cut:] for s in sorted(tree_slots)]


def oracle_top(context: list[int], vocab: int, budget: int, width: int, max_depth: int,
               temperature: float = 1.0, decay: float = 1.0) -> set[tuple[int, ...]]:
    """Exact top-`budget` token paths by cumulative draft log-probability, plus log(decay) per
    level (sequential Dijkstra)."""
    heap, out, counter = [], [], 0

    def push_children(path, score):
        nonlocal counter
        if len(path) >= max_depth:
            return
        logp = torch.log_softmax(known_logits(context + list(path), vocab) / temperature, -1)
        vals, ids = torch.topk(logp, width)
        for v, t in zip(vals.tolist(), ids.tolist()):
            counter += 1
            heapq.heappush(heap, (-(score + math.log(decay) + v), counter, path + (t,)))

    push_children((), 0.0)
    while heap and len(out) < budget:
        neg, _, path = heapq.heappop(heap)
        out.append(path)
        push_children(path, -neg)
    return set(out)
