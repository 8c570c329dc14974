import numpy as np
import pytest
import torch

from specexec.protocol.tree import ROOT, DraftTree
from tiny_models import ARCHS, tiny_lm
from specexec.verifier.target_model import TargetModel

PROMPT = [5, 17, 3, 44, 9, 12, 60]
TREE = DraftTree.build([10, 11, 20, 21, 22, 30, 31, 40],
                       [-1, -1, 0, 0, 1, 2, 2, 5])


def plain_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float()


def path_tokens(tree, node):
    return [int(tree.tokens[i]) for i in tree.path_to(node)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("split", [0, 3])  # whole prompt appended, or part of it cached already
def test_tree_forward_equals_sequential_paths(arch, split):
    model = tiny_lm(arch)
    target = TargetModel(model)
    cache = target.new_cache()
    if split:
        target.forward(cache, PROMPT[:split], DraftTree.empty())
    out = target.forward(cache, PROMPT[split:], TREE)
    worst = (out.logits(ROOT) - plain_logits(model, PROMPT)).abs().max()
    for node in range(len(TREE)):
        ref = plain_logits(model, PROMPT + path_tokens(TREE, node))
        worst = max(worst, (out.logits(node) - ref).abs().max())
    assert worst < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_cache_continues_like_a_fresh_forward(arch):
    model = tiny_lm(arch)
    target = TargetModel(model)
    cache = target.new_cache()
    target.forward(cache, PROMPT, TREE)
    accepted = [0, 2, 5]  # tokens 10, 20, 30
    target.commit(cache, len(TREE), accepted)
    assert cache.get_seq_length() == len(PROMPT) + 3
    committed = PROMPT + [10, 20, 30]
    bonus = 77
    nxt = DraftTree.build([1, 2, 3], [-1, 0, -1])
    out = target.forward(cache, [bonus], nxt)
    assert (out.logits(ROOT) - plain_logits(model, committed + [bonus])).abs().max() < 1e-4
    assert (out.logits(1) - plain_logits(model, committed + [bonus, 1, 2])).abs().max() < 1e-4


def test_head_is_applied_lazily_along_the_first_child_chain():
    model = tiny_lm("llama")
    target = TargetModel(model)
    calls = []
    target.head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    out = target.forward(target.new_cache(), PROMPT, TREE)
    out.logits(ROOT)
    assert calls == [5]  # root, 0, 2, 5, 7: the first-child chain, in one call
    out.logits(2), out.logits(7)
    assert calls == [5]
    out.logits(1)
    assert calls == [5, 2]  # 1 and its first child 4


def test_simulated_bus_time_is_added_once_per_forward():
    from harness import run
    from tiny_models import greedy_reference, perturbed
    model = tiny_lm("qwen2")
    slept = []
    target = TargetModel(model, simulate_bus_gbps=2.0, sleep=slept.append)
    out = run(target, perturbed(model, 0.05), PROMPT, 20, budget=8)
    assert len(slept) == out.stats.target_forwards == target.forwards
    expected = target.weight_bytes / 2e9
    assert target.weight_bytes > sum(p.numel() * 4 for p in model.parameters()) * 0.99
    assert all(s == pytest.approx(expected) for s in slept)
    assert out.token_ids == greedy_reference(model, PROMPT, 20)  # only time changes
