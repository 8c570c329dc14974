import pytest
import torch

from specexec.drafter.draft_model import DraftModel
from specexec.protocol.tree import ROOT
from tiny_models import ARCHS, tiny_lm

PROMPT = [5, 17, 3, 44, 9, 12, 60]


def plain_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("arch", ARCHS)
def test_expanded_nodes_equal_sequential_paths(arch):
    model = tiny_lm(arch)
    draft = DraftModel(model)
    root = draft.extend(PROMPT)
    assert (root - plain_logits(model, PROMPT)).abs().max() < 1e-4
    # slot 0: 10, slot 1: 11 (children of root); slots 2, 3 under slot 0; slot 4 under slot 3
    first = draft.expand([10, 11], [ROOT, ROOT])
    second = draft.expand([20, 21], [0, 0])
    third = draft.expand([30, 40], [3, 1])
    paths = {0: [10], 1: [11], 2: [10, 20], 3: [10, 21], 4: [10, 21, 30], 5: [11, 40]}
    got = torch.cat([first, second, third])
    for slot, path in paths.items():
        assert (got[slot] - plain_logits(model, PROMPT + path)).abs().max() < 1e-4, slot


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_commits_the_path_and_keeps_the_subtree(arch):
    model = tiny_lm(arch)
    draft = DraftModel(model)
    draft.extend(PROMPT)
    draft.expand([10, 11], [ROOT, ROOT])    # slots 0, 1
    draft.expand([20, 21], [0, 0])          # slots 2, 3
    draft.expand([30, 31], [3, 3])          # slots 4, 5
    draft.keep([0, 3], [4, 5])              # commit 10, 21; keep 30 and 31 as the new root's children
    assert draft.committed == len(PROMPT) + 2 and draft.n_slots == 2
    assert draft.slot_depth == [1, 1]
    committed = PROMPT + [10, 21]
    # expanding under the kept slot 4 (token 30) sees committed + 30
    out = draft.expand([50], [0])
    assert (out[0] - plain_logits(model, committed + [30, 50])).abs().max() < 1e-4
    draft.keep([0], [])                     # commit 30; drop the rest
    assert (draft.extend([51]) - plain_logits(model, committed + [30, 51])).abs().max() < 1e-4


def test_extend_refuses_open_slots():
    draft = DraftModel(tiny_lm("llama"))
    draft.extend(PROMPT)
    draft.expand([1], [ROOT])
    with pytest.raises(RuntimeError, match="open tree slots"):
        draft.extend([2])


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_after_rounds_of_keep_equals_a_fresh_prefill(arch):
    """Past the buffer's first capacity, through several rounds of commit-and-keep, the cache's
    committed part equals a fresh prefill of the committed text, and kept slots still work."""
    model = tiny_lm(arch)
    draft = DraftModel(model)
    committed = [(7 * i) % 90 + 1 for i in range(250)]
    draft.extend(committed)
    for r in range(3):
        draft.expand([10 + r, 11 + r], [ROOT, ROOT])       # slots 0, 1
        draft.expand([20, 21, 22], [0, 0, 1])              # slots 2, 3, 4
        draft.expand([30], [3])                            # slot 5, under 10+r, 21
        draft.keep([0, 3], [5])                            # commit 10+r, 21; keep 30
        committed += [10 + r, 21]
        out = draft.expand([40], [0])                      # under the kept 30
        assert (out[0] - plain_logits(model, committed + [30, 40])).abs().max() < 1e-4
        draft.keep([0], [])                                # commit 30, drop 40
        committed.append(30)
    fresh = DraftModel(model)
    fresh.extend(committed)
    for mine, ref in zip(draft.cache.layers, fresh.cache.layers):
        assert mine.keys.shape == ref.keys.shape
        assert (mine.keys - ref.keys).abs().max() < 1e-4 and (mine.values - ref.values).abs().max() < 1e-4


def test_repetition_penalty_uses_each_nodes_own_context():
    from specexec.protocol.sampling import penalize, seen_mask
    model = tiny_lm("llama")
    draft = DraftModel(model)
    draft.repetition_penalty = 1.4
    vocab = draft.vocab_size

    def want(ids):
        return penalize(plain_logits(model, ids), seen_mask(ids, vocab), 1.4)

    root = draft.extend(PROMPT)
    assert torch.allclose(root, want(PROMPT), atol=1e-4)
    first = draft.expand([10, 11], [ROOT, ROOT])
    second = draft.expand([20], [1])
    assert torch.allclose(first[0], want(PROMPT + [10]), atol=1e-4)
    assert torch.allclose(second[0], want(PROMPT + [11, 20]), atol=1e-4)
    draft.keep([1], [2])  # commit 11, keep its child 20
    assert draft.history == PROMPT + [11] and draft.slot_tokens == [20]
    third = draft.expand([21], [0])
    assert torch.allclose(third[0], want(PROMPT + [11, 20, 21]), atol=1e-4)
    assert not torch.allclose(third[0], plain_logits(model, PROMPT + [11, 20, 21]), atol=1e-4)
