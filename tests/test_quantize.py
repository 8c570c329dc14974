import copy

import pytest
import torch

from specexec.drafter.draft_model import DraftModel
from specexec.drafter.quantize import int8_linear, int8_supported, quantize_int8
from harness import run
from tiny_models import greedy_reference, perturbed, tiny_lm

pytestmark = pytest.mark.skipif(not int8_supported(), reason="this PyTorch/CPU has no int8 dynamic linear")
PROMPTS = [[3, 14, 15, 9, 2, 6], [50, 51, 52], [88, 1, 88, 1, 88, 1]]


def test_int8_linear_tracks_the_float_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512)
    x = torch.randn(7, 256)
    with torch.inference_mode():
        want, got = linear(x), int8_linear(linear)(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() / want.abs().max() < 0.02


def test_every_linear_is_swapped_and_the_distribution_stays_close():
    """int8 moves the next-token distribution less than the 0.05-noise drafts the other tests use
    (total variation ~0.07 against ~0.2 on these tiny random models)."""
    model = tiny_lm("qwen2")
    quantized = copy.deepcopy(model)
    assert quantize_int8(quantized) == 2 * 7 + 1  # 7 linears per layer, 2 layers, and the head
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    ids = torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = model(ids).logits.softmax(-1), quantized(ids).logits.softmax(-1)
    total_variation = 0.5 * (got - want).abs().sum(-1).mean()
    assert total_variation < 0.12


@pytest.mark.parametrize("method, shape, rate", [("specexec", {}, 2), ("chain", {}, 2),
                                                 ("specinfer", dict(branch_width=2, max_depth=8), 1)])
def test_int8_draft_leaves_the_output_to_the_target(method, shape, rate):
    """The draft only proposes: with int8 weights the output is still the target's own greedy.
    (SpecInfer samples its chains at temperature 1 even at t=0, as the reference does, so a greedy
    target accepts fewer of them.)"""
    model = tiny_lm("llama")
    draft_model = perturbed(model, 0.05)
    quantize_int8(draft_model)
    draft = DraftModel(draft_model, weights="int8")
    for prompt in PROMPTS:
        out = run(model, draft, prompt, 24, method=method, budget=16, **shape)
        assert out.token_ids == greedy_reference(model, prompt, 24)
    assert out.stats.gen_rate > rate  # and it still drafts usefully
