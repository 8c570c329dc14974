import numpy as np
import pytest
import torch

from specexec.protocol.tree import ROOT, DraftTree, TreeError, ancestor_matrix, verify_mask, verify_positions

#        root
#       /    \
#      0(5)   1(7)
#     /  \      \
#   2(1) 3(2)   4(5)
#    |
#   5(9)
TOKENS = [5, 7, 1, 2, 5, 9]
PARENTS = [-1, -1, 0, 0, 1, 2]


def tree():
    return DraftTree.build(TOKENS, PARENTS)


def test_depths_children_paths():
    t = tree()
    assert t.depths().tolist() == [1, 1, 2, 2, 2, 3]
    assert t.children(ROOT) == [0, 1]
    assert t.children(0) == [2, 3]
    assert t.children(5) == []
    assert t.path_to(5) == [0, 2, 5]
    assert t.child_with_token(1, 5) == 4
    assert t.child_with_token(1, 6) is None


def test_valid_tree_passes():
    tree().validate(vocab_size=10)
    DraftTree.empty().validate(vocab_size=10)


@pytest.mark.parametrize("tokens, parents, message", [
    ([1, 2], [-1, 1], "node 1: parent 1 is not an earlier node"),
    ([1, 2, 3], [-1, 2, 0], "node 1: parent 2 is not an earlier node"),
    ([1, 2], [-1, -2], "node 1: parent -2"),
    ([1, 10], [-1, 0], "node 1: token id 10 out of range"),
    ([1, -3], [-1, 0], "node 1: token id -3 out of range"),
    ([4, 4], [-1, -1], "node 1: token 4 duplicates a sibling under parent -1"),
    ([1, 3, 3], [-1, 0, 0], "node 2: token 3 duplicates a sibling under parent 0"),
    ([1, 2], [-1], "must be 1-D arrays of the same length"),
])
def test_invalid_trees_are_named(tokens, parents, message):
    with pytest.raises(TreeError, match=message):
        DraftTree.build(tokens, parents).validate(vocab_size=10)


def test_same_token_under_different_parents_is_fine():
    DraftTree.build([3, 3, 3], [-1, 0, 1]).validate(vocab_size=10)


def test_draft_probs_must_cover_children():
    q_ids = np.zeros((3, 2), dtype=np.int32)
    q_probs = np.zeros((3, 2), dtype=np.float32)
    q_ids[0], q_probs[0] = [4, 6], [0.5, 0.5]  # root's children come from {4, 6}
    q_ids[1], q_probs[1] = [2, 0], [1.0, 0.0]
    DraftTree.build([4, 2], [-1, 0], q_ids, q_probs).validate(10)
    with pytest.raises(TreeError, match="node 1: token 3 has no draft probability"):
        DraftTree.build([4, 3], [-1, 0], q_ids, q_probs).validate(10)
    with pytest.raises(TreeError, match=r"must be \[3, K\]"):
        DraftTree.build([4, 2], [-1, 0], q_ids[:2], q_probs[:2]).validate(10)
    with pytest.raises(TreeError, match="finite and non-negative"):
        bad = q_probs.copy()
        bad[0, 0] = np.nan
        DraftTree.build([4, 2], [-1, 0], q_ids, bad).validate(10)


def test_ancestor_matrix_is_path_closure():
    t = tree()
    anc = ancestor_matrix(t.parents)
    for i in range(len(t)):
        assert set(torch.nonzero(anc[i]).flatten().tolist()) == set(t.path_to(i))


def test_verify_mask_layout():
    past, n_append = 3, 2
    t = tree()
    mask = verify_mask(past, n_append, t.parents, torch.float32)
    assert mask.shape == (1, 1, n_append + len(t), past + n_append + len(t))
    visible = (mask[0, 0] == 0)
    # appended tokens: causal over the cached prefix and each other
    assert visible[0, :4].all() and not visible[0, 4:].any()
    assert visible[1, :5].all() and not visible[1, 5:].any()
    # tree node 5 sees the prefix, nodes 0, 2 and itself only
    row = visible[n_append + 5]
    assert row[:5].all()
    assert set((torch.nonzero(row[5:]).flatten()).tolist()) == {0, 2, 5}
    assert mask.min() == torch.finfo(torch.float32).min


def test_positions_follow_depth():
    pos = verify_positions(3, 2, tree().depths())
    assert pos.tolist() == [[3, 4, 5, 5, 6, 6, 6, 7]]
