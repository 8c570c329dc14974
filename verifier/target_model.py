"""The target model: one forward over `append + tree` on its KV cache, logits on demand, pruning.

The forward runs the decoder only; the language-model head is applied lazily to the nodes the
acceptance walk visits (a handful per round), not to every tree node: with a 152k vocabulary
the head over a 256-node tree would be a sixth of the forward's work, almost all of it unused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from specexec.protocol.kv_prune import cache_length, gather_cache, keep_prefix_and
from specexec.protocol.cache_keyword import cache_keyword
from specexec.protocol.tree import ROOT, DraftTree, verify_mask, verify_positions
from specexec.verifier.disk_streamer import StreamStats, streamer_of
from specexec.verifier.placement import streams_weights


@dataclass
class TreeOutputs:
    """Decoder states of one verification forward; `logits(node)` applies the head on demand.

    A miss at node v computes the head, in one batch, for v and the chain of first children
    below it: siblings come in the draft's order of preference, so that chain is the path the
    draft thinks most likely, and a walk that follows it costs a single head call.
    """

    hidden: torch.Tensor  # [A + N, H]: appended tokens, then tree nodes
    n_append: int
    head: torch.nn.Module
    tree: DraftTree
    _logits: dict = field(default_factory=dict)

    def logits(self, node: int) -> torch.Tensor:
        """Target logits after `node` (ROOT: after the last appended token)."""
        if node not in self._logits:
            chain = [node]
            while kids := self.tree.children(chain[-1]):
                chain.append(kids[0])
            rows = [self.n_append - 1 if n == ROOT else self.n_append + n for n in chain]
            with torch.inference_mode():
                out = self.head(self.hidden[rows]).float()
            self._logits.update(zip(chain, out))
        return self._logits[node]


class TargetModel:
    """A causal LM run over trees; each session owns its KV cache (`new_cache`).

    `simulate_bus_gbps`: after every forward, wait as long as streaming the weights over a bus of
    that many GB/s would take -- the offloaded regime (weights crossing PCIe each pass) on a
    machine that holds them in fast memory. Results are unchanged; only time is added.
    """

    def __init__(self, model: torch.nn.Module, simulate_bus_gbps: float | None = None, sleep=time.sleep):
        self.model = model.eval()
        self.streamer = streamer_of(model)  # a disk streamer's read counters, where the layers stream from disk
        self._streamed = self.streamer.snapshot() if self.streamer else None
        self.last_stream: StreamStats | None = None  # what the disk read for the last forward
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
            b.numel() * b.element_size() for b in model.buffers())
        self.simulate_bus_gbps = simulate_bus_gbps
        # every forward moves the weights into the computing device (or waits as if it did): told to
        # drafters (their default budget) and sizing the prefill chunks
        self.offloaded = streams_weights(model) or bool(simulate_bus_gbps)
        self.simulated_s = 0.0
        self._sleep = sleep
        self.decoder = getattr(model, model.base_model_prefix)
        self.cache_keyword = cache_keyword(self.decoder)
        self.head = model.get_output_embeddings()
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.config.vocab_size)
        self.forwards = 0

    @property
    def max_context(self) -> int:
        """Committed + tree tokens the model's positions allow."""
        return int(getattr(self.model.config, "max_position_embeddings", None) or 2**31)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    @property
    def input_device(self) -> torch.device:
        device = self.decoder.get_input_embeddings().weight.device
        return torch.device("cpu") if device.type == "meta" else device  # accelerate: offloaded to disk

    def forward(self, cache: DynamicCache, append: list[int], tree: DraftTree) -> TreeOutputs:
        """Run `append + tree` on top of `cache`; appended tokens and tree nodes enter the cache."""
        if not append:
            raise ValueError("a verification forward needs at least one appended token (the root)")
        past = cache_length(cache)
        tokens = np.concatenate([np.asarray(append, dtype=np.int64), tree.tokens.astype(np.int64)])
        device = self.input_device
        ids = torch.from_numpy(tokens)[None].to(device)
        mask = verify_mask(past, len(append), tree.parents, self.dtype).to(device)
        positions = verify_positions(past, len(append), tree.depths()).to(device)
        with torch.inference_mode():
            out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                               use_cache=True, **{self.cache_keyword: cache})
        self.forwards += 1
        if self.streamer:  # reads since the previous forward: this pass's layers, prefetched ones included
            now = self.streamer.snapshot()
            self.last_stream, self._streamed = now - self._streamed, now
        if self.simulate_bus_gbps:
            delay = self.weight_bytes / (self.simulate_bus_gbps * 1e9)
            self._sleep(delay)
            self.simulated_s += delay
        return TreeOutputs(out.last_hidden_state[0], len(append), self.head, tree)

    @staticmethod
    def truncate(cache: DynamicCache, length: int) -> None:
        extra = cache_length(cache) - length
        if extra > 0:
            cache.crop(-extra)

    @staticmethod
    def commit(cache: DynamicCache, tree_len: int, accepted: list[int]) -> None:
        """Prune `cache` to everything before the tree plus the accepted nodes, in path order."""
        if not tree_len:
            return
        base = cache_length(cache) - tree_len
        gather_cache(cache, keep_prefix_and(base, [base + i for i in accepted]))
