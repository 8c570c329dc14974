import pytest
import torch

from launch.packed_linear import PackedLinear, pack_linears, packing_works
from tiny_models import tiny_lm

pytestmark = pytest.mark.skipif(not packing_works(), reason="this PyTorch/CPU has no packed bf16 linear")


def test_packed_model_is_bit_identical():
    model = tiny_lm("qwen2").to(torch.bfloat16)
    ids = torch.randint(0, 96, (1, 12))
    with torch.inference_mode():
        before = model(ids).logits
    assert pack_linears(model) == 2 * 7 + 1  # 7 linears per layer, 2 layers, and the head
    assert isinstance(model.lm_head, PackedLinear)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)


def test_float32_models_are_left_alone():
    model = tiny_lm("llama")
    assert pack_linears(model) == 0
