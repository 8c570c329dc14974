"""The sampling rule: how target logits, repetition penalty, temperature, top-k, top-p and min-p become
the distribution we emit from (in that order, as transformers applies its processors and warpers).
The penalty needs the context (`penalize`): the caller applies it to the logits it hands in.

Both sides must agree on it bit for bit, so it lives here. Randomness is keyed by position:
the uniform used for the token at absolute position `pos` of a session seeded `seed` is a hash
of (seed, pos, draw). The SpecExec walk spends exactly one uniform per emitted token, so a
seeded run emits the same tokens whatever trees the drafter sends, with or without overlap,
after a verifier restart, and the same as plain autoregressive sampling with that seed.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import torch

TOP_P_SHORTLIST = 512  # nucleus search starts from the top-k; the full sort is the fallback
# Temperatures below this are greedy (stored as 0): logits / 1e-40 overflow float32 to inf and
# softmax gives NaN; at 1e-4 a logit gap of 0.01 already weighs e^-100 against the runner-up, so
# only exact ties could be sampled differently.
GREEDY_BELOW = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0  # keep the k most probable tokens (0: all)
    min_p: float = 0.0  # drop tokens below min_p times the most probable one's probability (0: none)
    repetition_penalty: float = 1.0  # logits of tokens already in the context: / p if positive, * p if not

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and math.isfinite(self.repetition_penalty)
                and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)  # both sides build these: both see greedy

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def seen_mask(tokens, vocab_size: int) -> torch.Tensor:
    """A bool [V] mask of the token ids in `tokens` (the context a repetition penalty looks at)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    ids = torch.as_tensor(list(tokens) if not isinstance(tokens, torch.Tensor) else tokens, dtype=torch.long)
    mask[ids[(ids >= 0) & (ids < vocab_size)]] = True
    return mask


def penalize(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """The repetition penalty of transformers and llama.cpp (CTRL's): logits of the `seen` tokens are
    divided by `penalty` where positive, multiplied where not. Applied before temperature and the
    filters, to the target's logits (the verifier) and the draft's alike; a new tensor."""
    if penalty == 1.0 or seen is None:
        return logits
    flat = logits.reshape(-1)
    mask = seen.to(flat.device)[:flat.numel()]
    scaled = torch.where(flat > 0, flat / penalty, flat * penalty)
    return torch.where(mask, scaled, flat).reshape(logits.shape)


def target_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Dense float64 probabilities [V] after temperature and top-p; one-hot argmax when greedy."""
    logits = logits.detach().reshape(-1).to(torch.float64)
    if params.greedy:
        probs = torch.zeros_like(logits)
        probs[int(torch.argmax(logits))] = 1.0
        return probs
    probs = require_finite(torch.softmax(logits / params.temperature, dim=-1), "target")
    if 0 < params.top_k < probs.numel():
        probs = _top_k(probs, params.top_k)
    if params.top_p < 1.0:
        probs = _nucleus(probs, params.top_p)
    if params.min_p > 0:
        probs = _min_p(probs, params.min_p)
    return probs


def _top_k(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k most probable tokens (ties at the k-th value broken by torch.topk); renormalise."""
    vals, ids = torch.topk(probs, k)
    out = torch.zeros_like(probs)
    out[ids] = vals / vals.sum()
    return out


def _min_p(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with probability >= min_p * the largest; renormalise (the largest always stays)."""
    out = torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
    return out / out.sum()


def require_finite(probs: torch.Tensor, what: str) -> torch.Tensor:
    """Refuse a probability vector holding NaN or inf (from non-finite logits), naming where it was made."""
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"{what} probabilities are not finite (the model's logits hold NaN or inf)")
    return probs


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose mass reaches top_p; renormalise."""
    k = min(TOP_P_SHORTLIST, probs.numel())
    vals, ids = torch.topk(probs, k, sorted=True)
    if float(vals.sum()) < top_p and k < probs.numel():
        vals, ids = torch.sort(probs, descending=True)
    cum = torch.cumsum(vals, 0)
    keep = int(torch.searchsorted(cum, torch.tensor([top_p], dtype=cum.dtype))) + 1
    keep = min(max(keep, 1), vals.numel())
    out = torch.zeros_like(probs)
    out[ids[:keep]] = vals[:keep] / vals[:keep].sum()
    return out


def sample(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw in token-id order with one uniform u in [0, 1)."""
    cdf = torch.cumsum(probs, 0)
    x = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype), right=True))
    x = min(x, probs.numel() - 1)
    while probs[x] <= 0:  # u landed on a float boundary past the last non-zero entry
        x -= 1
    return x


def uniform(seed: int, position: int, draw: int = 0) -> float:
    """Deterministic uniform in [0, 1) for (seed, absolute position, draw index)."""
    digest = hashlib.blake2b(struct.pack("<qqq", seed, position, draw), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * (1.0 / (1 << 53))


def emit(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """The token plain decoding emits at `position`: argmax, or one keyed draw from the rule."""
    if params.greedy:
        return int(torch.argmax(logits.reshape(-1)))
    return sample(target_distribution(logits, params), uniform(params.seed, position))
