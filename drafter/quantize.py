"""Int8 weights for the draft model on a CPU: dynamic quantization of its linear layers.

The draft only proposes; the target decides every emitted token, so an approximate draft changes
how many tokens a round accepts, never which tokens come out. On a CPU the draft's forward is
bound by reading its weights, and int8 reads a quarter of float32's bytes: on a 2-core AVX2
machine the 0.5B draft's decoder went from 121 to 51 ms for one token and from 268 to 102 ms for
16 (fbgemm's dynamic-quantized linear, per-output-channel symmetric scales).

We quantize each weight ourselves (one vectorised pass) and hand it to PyTorch's dynamic
quantized `Linear`, which prepacks it for fbgemm; the layers are spread over a small thread pool
because prepacking runs on one core. That takes ~5 s for the 0.5B draft on 2 cores, against
~16 s through `quantize_dynamic`'s observers.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

ENGINES = ("x86", "fbgemm")  # PyTorch's int8 CPU backends with fast dynamic linear kernels


def _dynamic_linear():
    from torch.ao.nn.quantized.dynamic import Linear
    return Linear


def quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 quantization of a [out, in] float weight."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    return torch._make_per_channel_quantized_tensor(q, scales.double(), zero, 0)


def int8_linear(linear: torch.nn.Linear) -> torch.nn.Module:
    """The dynamic-quantized twin of `linear` (float activations in and out, int8 weights)."""
    with warnings.catch_warnings(), torch.inference_mode():
        # PyTorch announces that quantized tensors will move out of core (to torchao); while they
        # are here they are the fast int8 CPU path, and `int8_supported` notices when they are gone.
        warnings.simplefilter("ignore")
        qlinear = _dynamic_linear()(linear.in_features, linear.out_features, bias_=linear.bias is not None,
                                    dtype=torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        qlinear.set_weight_bias(quantize_weight(linear.weight), bias)
    return qlinear


def int8_supported() -> bool:
    """True when this PyTorch build runs int8 dynamic linears on this CPU and they are accurate."""
    if torch.backends.quantized.engine not in ENGINES:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        linear = torch.nn.Linear(64, 48)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(48, 64, generator=gen))
        x = torch.randn(5, 64, generator=gen)
        with torch.inference_mode():
            got, want = int8_linear(linear)(x), linear(x)
        return bool(((got - want).abs().max() / want.abs().max()) < 0.05)
    except (RuntimeError, AttributeError, ImportError):
        return False


def quantize_int8(model: torch.nn.Module, threads: int | None = None) -> int:
    """Swap every float CPU `nn.Linear` of `model` for its int8 twin, in place; returns how many."""
    jobs = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is torch.nn.Linear and child.weight.device.type == "cpu"]
    threads = threads or max(torch.get_num_threads(), 1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per layer; the pool runs layers side by side
    try:
        with ThreadPoolExecutor(threads) as pool:
            for (parent, name, _), qlinear in zip(jobs, pool.map(lambda job: int8_linear(job[2]), jobs)):
                setattr(parent, name, qlinear)
    finally:
        torch.set_num_threads(before)
    return len(jobs)
