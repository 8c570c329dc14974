import warnings

import pytest

from specexec.drafter.draft_model import DraftModel
from specexec.protocol.cache_keyword import cache_keyword
from specexec.protocol.tree import ROOT, DraftTree
from specexec.verifier.target_model import TargetModel
from tiny_models import ARCHS, tiny_lm

PROMPT = [5, 17, 3, 44, 9]


@pytest.mark.parametrize("arch", ARCHS)
def test_both_wrappers_run_without_deprecation_warnings(arch):
    model = tiny_lm(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        draft = DraftModel(model)
        draft.extend(PROMPT)
        draft.expand([10, 11], [ROOT, ROOT])
        target = TargetModel(model)
        cache = target.new_cache()
        out = target.forward(cache, PROMPT, DraftTree.build([10, 11], [-1, 0]))
        out.logits(ROOT)


def test_keyword_follows_the_declared_signature():
    class Old:
        def forward(self, input_ids, past_key_values=None): ...

    class New:
        def forward(self, input_ids, cache=None): ...

    assert cache_keyword(Old()) == "past_key_values" and cache_keyword(New()) == "cache"
