import pytest
import torch

from specexec.launch import loading
from tiny_models import tiny_lm


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    tiny_lm("qwen2").to(torch.bfloat16).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("native, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_keeps_bf16_only_where_it_is_computed_natively(bf16_checkpoint, monkeypatch, native, want):
    monkeypatch.setattr(loading, "computes_bf16", lambda device: native)
    assert loading.resolve_dtype("auto", bf16_checkpoint) == want


def test_explicit_dtype_wins_and_unknown_is_refused(bf16_checkpoint):
    assert loading.resolve_dtype("float32", bf16_checkpoint) == torch.float32
    assert loading.resolve_dtype("bfloat16", bf16_checkpoint) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        loading.resolve_dtype("float8", bf16_checkpoint)


def test_float32_checkpoint_stays_float32(tmp_path):
    tiny_lm("llama").save_pretrained(tmp_path)
    assert loading.resolve_dtype("auto", str(tmp_path)) == torch.float32
