"""The target's forward cost against the number of tokens: the curve `--budget auto` builds on.

Each size n is timed as a real verification forward: a tree of n nodes on top of a cached
prefix, with the tree mask, exactly what a round with budget n-1 costs.
"""

from __future__ import annotations

import statistics
import time

from specexec.protocol.tree import DraftTree
from specexec.verifier.target_model import TargetModel

SIZES = (1, 4, 16, 64, 256, 1024)


def chain(n: int, vocab: int) -> DraftTree:
    return DraftTree.build([(1000 + i) % vocab for i in range(n)], list(range(-1, n - 1)))


def forward_curve(target: TargetModel, sizes=SIZES, prefix: int = 256, trials: int = 2) -> dict[int, float]:
    """Seconds per verification forward over n tokens (1 appended + n-1 tree nodes)."""
    curve, vocab = {}, target.vocab_size
    cache = target.new_cache()
    target.forward(cache, [(100 + i) % vocab for i in range(prefix)], DraftTree.empty())
    target.forward(cache, [7], chain(3, vocab))  # first forwards of a shape are slow: keep one out
    target.commit(cache, 3, [])
    for n in sizes:
        times = []
        for _ in range(trials):
            t = time.perf_counter()
            target.forward(cache, [7], chain(n - 1, vocab))
            times.append(time.perf_counter() - t)
            target.commit(cache, n - 1, [])
            target.truncate(cache, prefix + 1)
        curve[n] = statistics.median(times)
    return curve
