"""The draft model with a tree-aware KV cache.

The cache holds the committed prefix (the last committed token is the tree's root) followed by
one slot per tree node expanded so far, in expansion order. A batch of new nodes attends to the
prefix, to its ancestors' slots and to itself; its position is the root's plus its depth. At the
end of a round `keep` commits the accepted path and keeps the subtree worth reusing: only the
tree part of the cache moves (drafter.kv_buffer), the committed prefix stays in place.

With a repetition penalty (`repetition_penalty`, set per request) the logits returned are penalized
with each position's own context -- the committed tokens, the node's ancestors and the node -- as
the verifier penalizes the target's, so the draft proposes what the penalized target would emit.
"""

from __future__ import annotations

import torch
from specexec.drafter.kv_buffer import BufferCache
from specexec.protocol.cache_keyword import cache_keyword
from specexec.protocol.sampling import penalize, seen_mask
from specexec.protocol.tree import ROOT, additive_mask


class DraftModel:
    def __init__(self, model: torch.nn.Module, weights: str | None = None):
        self.model = model.eval()
        self.decoder = getattr(model, model.base_model_prefix)
        self.cache_keyword = cache_keyword(self.decoder)
        self.head = model.get_output_embeddings()
        self.dtype = next(model.parameters()).dtype  # of the activations (and the attention mask)
        self.weights = weights or str(self.dtype).removeprefix("torch.")  # e.g. int8 (drafter.quantize)
        self.vocab_size = int(model.config.vocab_size)
        self.forwards = 0
        self.repetition_penalty = 1.0  # applied to the logits returned; the request's SamplingParams'
        self.reset()

    def reset(self) -> None:
        self.cache = BufferCache()
        self.committed = 0
        self.history: list[int] = []  # the committed tokens, in order
        self.slot_tokens: list[int] = []
        self.slot_depth: list[int] = []
        self.slot_anc = torch.zeros(0, 0, dtype=torch.bool)  # [S, S] ancestor-or-self among slots

    @property
    def n_slots(self) -> int:
        return len(self.slot_depth)

    @property
    def device(self) -> torch.device:
        return self.decoder.get_input_embeddings().weight.device

    def _run(self, ids: list[int], positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        device = self.device
        with torch.inference_mode():
            out = self.decoder(input_ids=torch.tensor([ids], device=device),
                               position_ids=positions[None].to(device),
                               attention_mask=None if mask is None else mask.to(device),
                               use_cache=True, **{self.cache_keyword: self.cache})
            hidden = out.last_hidden_state[0]
            self.forwards += 1
            return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.head(hidden).float()

    def extend(self, tokens: list[int]) -> torch.Tensor:
        """Append committed tokens (no tree slots may be open); logits [V] after the last one."""
        if self.n_slots:
            raise RuntimeError("extend with open tree slots: call keep() first")
        if not tokens:
            raise ValueError("extend needs at least one token")
        positions = torch.arange(self.committed, self.committed + len(tokens))
        hidden = self._run(list(tokens), positions, None)
        self.committed += len(tokens)
        self.history.extend(int(t) for t in tokens)
        return self._penalized(self.logits(hidden[-1:]), [[]])[0]

    def expand(self, tokens: list[int], parent_slots: list[int]) -> torch.Tensor:
        """Add tree nodes whose parents are existing slots (ROOT: the last committed token).

        Returns the logits [n, V] after each new node, which now occupy the next n slots.
        """
        n, s, c = len(tokens), self.n_slots, self.committed
        parents = torch.as_tensor(parent_slots, dtype=torch.long)
        inherited = torch.zeros(n, s, dtype=torch.bool)
        has_parent = parents != ROOT
        if s and bool(has_parent.any()):
            inherited[has_parent] = self.slot_anc[parents[has_parent]]
        depth = [1 if p == ROOT else self.slot_depth[p] + 1 for p in parent_slots]
        visible = torch.ones(n, c + s + n, dtype=torch.bool)
        visible[:, c:c + s] = inherited
        visible[:, c + s:] = torch.eye(n, dtype=torch.bool)
        positions = torch.tensor(depth) + (c - 1)
        hidden = self._run(list(tokens), positions, additive_mask(visible, self.dtype))
        grown = torch.zeros(s + n, s + n, dtype=torch.bool)
        grown[:s, :s] = self.slot_anc
        grown[s:, :s] = inherited
        grown[s:, s:] = torch.eye(n, dtype=torch.bool)
        self.slot_anc = grown
        self.slot_depth.extend(depth)
        self.slot_tokens.extend(int(t) for t in tokens)
        paths = [[self.slot_tokens[j] for j in torch.nonzero(grown[s + i]).flatten().tolist()] for i in range(n)]
        return self._penalized(self.logits(hidden), paths)

    def _penalized(self, logits: torch.Tensor, paths: list[list[int]]) -> torch.Tensor:
        """`logits` [n, V] with the repetition penalty of each row's context: history + paths[row]."""
        if self.repetition_penalty == 1.0:
            return logits
        base = seen_mask(self.history, logits.shape[-1])
        rows = []
        for row, path in zip(logits, paths):
            seen = base.clone()
            seen[torch.as_tensor(path, dtype=torch.long)] = True
            rows.append(penalize(row, seen, self.repetition_penalty))
        return torch.stack(rows)

    def keep(self, path_slots: list[int], tree_slots: list[int]) -> None:
        """Commit `path_slots` (a root-to-node chain) and keep `tree_slots` (their subtree)."""
        if self.cache.get_seq_length() != self.committed + self.n_slots:
            raise RuntimeError("draft cache out of step with its slot table")
        self.cache.compact(self.committed, path_slots + sorted(tree_slots))
        self.history.extend(self.slot_tokens[i] for i in path_slots)
        self.slot_tokens = [self.slot_tokens[i] for i in sorted(tree_slots)]
        idx = torch.as_tensor(sorted(tree_slots), dtype=torch.long)
        self.slot_anc = self.slot_anc[idx][:, idx]
        self.slot_depth = [self.slot_depth[i] - len(path_slots) for i in sorted(tree_slots)]
        self.committed += len(path_slots)
