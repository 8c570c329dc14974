import copy

import pytest
import torch

from harness import run
from specexec.launch.packed_linear import PackedLinear, pack_linears, packing_works
from tiny_models import greedy_reference, perturbed, tiny_lm

PROMPT = [3, 14, 15, 9, 2, 6]


def needs(dtype):
    return pytest.mark.skipif(not packing_works(dtype), reason=f"this PyTorch/CPU has no packed {dtype} linear")


@needs(torch.bfloat16)
def test_packed_bf16_model_is_bit_identical():
    model = tiny_lm("qwen2").to(torch.bfloat16)
    ids = torch.randint(0, 96, (1, 12))
    with torch.inference_mode():
        before = model(ids).logits
    assert pack_linears(model) == 2 * 7 + 1  # 7 linears per layer, 2 layers, and the head
    assert isinstance(model.lm_head, PackedLinear)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)


@needs(torch.float32)
def test_packed_float32_model_agrees_to_rounding():
    model = tiny_lm("llama")
    packed = copy.deepcopy(model)
    assert pack_linears(packed) == 2 * 7 + 1
    ids = torch.randint(0, 96, (1, 12))
    with torch.inference_mode():
        assert torch.allclose(packed(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


@needs(torch.float32)
@pytest.mark.parametrize("method", ["specexec", "chain"])
def test_packed_pair_decodes_like_the_plain_target(method):
    """Tree verification through packed linears still reproduces the plain target's greedy output."""
    model = tiny_lm("qwen2")
    target, draft = copy.deepcopy(model), perturbed(model, 0.05)
    assert pack_linears(target) and pack_linears(draft)
    out = run(target, draft, PROMPT, 24, method=method, budget=16)
    assert out.token_ids == greedy_reference(model, PROMPT, 24)


def test_other_dtypes_are_left_alone():
    model = tiny_lm("llama").to(torch.float16)
    assert pack_linears(model) == 0
