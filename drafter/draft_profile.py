"""The draft's forward time against the number of nodes expanded at once."""

from __future__ import annotations

import statistics
import time

from specexec.drafter.draft_model import DraftModel
from specexec.protocol.tree import ROOT

SIZES = (1, 4, 16, 64)


def draft_curve(draft: DraftModel, sizes=SIZES, prefix: int = 256, trials: int = 2) -> dict[int, float]:
    """Seconds per draft forward expanding n nodes under a `prefix`-token committed sequence."""
    vocab = draft.vocab_size
    draft.reset()
    draft.extend([(100 + i) % vocab for i in range(prefix)])
    draft.expand([5, 6, 7], [ROOT] * 3)  # keep the first (slow) forward of a shape out
    draft.keep([], [])
    curve = {}
    for n in sizes:
        times = []
        for _ in range(trials):
            t = time.perf_counter()
            draft.expand([(1000 + i) % vocab for i in range(n)], [ROOT] * n)
            times.append(time.perf_counter() - t)
            draft.keep([], [])
        curve[n] = statistics.median(times)
    draft.reset()
    return curve
