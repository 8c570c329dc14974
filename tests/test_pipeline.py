import pytest
import torch

from specexec.drafter.budget_tuner import BudgetTuners
from specexec.drafter.session import RunOptions
from specexec.launch import pipeline
from tiny_models import tiny_lm


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    tiny_lm("qwen2").to(torch.bfloat16).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("native, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_keeps_bf16_only_where_it_is_computed_natively(bf16_checkpoint, monkeypatch, native, want):
    monkeypatch.setattr(pipeline, "computes_bf16", lambda device: native)
    assert pipeline.resolve_dtype("auto", bf16_checkpoint) == want


def test_explicit_dtype_wins_and_unknown_is_refused(bf16_checkpoint):
    assert pipeline.resolve_dtype("float32", bf16_checkpoint) == torch.float32
    assert pipeline.resolve_dtype("bfloat16", bf16_checkpoint) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        pipeline.resolve_dtype("float8", bf16_checkpoint)


def test_float32_checkpoint_stays_float32(tmp_path):
    tiny_lm("llama").save_pretrained(tmp_path)
    assert pipeline.resolve_dtype("auto", str(tmp_path)) == torch.float32


def _options(budget_auto=True, temperature=0.0):
    from specexec.drafter.tree_search import TreeConfig
    from specexec.protocol.sampling import SamplingParams
    return RunOptions(TreeConfig("specexec", 64), SamplingParams(temperature, 1.0, 0), 16,
                               budget_auto=budget_auto)


def test_budget_tuners_are_kept_per_context_and_settings():
    tuners = BudgetTuners(lambda: {1: 0.1}, lambda: {1: 0.01})
    chat = tuners.for_run(_options(), "chat")
    assert tuners.for_run(_options(), "chat") is chat  # a chat warms up once
    assert tuners.for_run(_options(), "humaneval") is not chat
    assert tuners.for_run(_options(temperature=0.6), "chat") is not chat
    assert tuners.for_run(_options(), None) is not tuners.for_run(_options(), None)  # no context: fresh
    assert tuners.for_run(_options(budget_auto=False), "chat") is None
