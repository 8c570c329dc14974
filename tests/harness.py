"""Build an in-process pipeline from two model objects, for tests."""

from __future__ import annotations

from specexec.drafter.draft_model import DraftModel
from specexec.drafter.session import DraftSession
from specexec.drafter.search_api import make_search
from specexec.drafter.tree_search import TreeConfig
from specexec.protocol.sampling import SamplingParams
from specexec.verifier.inprocess import InProcessVerifier
from specexec.verifier.session import SessionConfig, TargetSession
from specexec.verifier.target_model import TargetModel


def run(target, draft, prompt, n, method="specexec", budget=16, params=SamplingParams(),
        overlap=False, stop_ids=frozenset(), max_context=None, auto_budget=None, **tree_kw):
    """Generate `n` tokens; `target`/`draft` are TargetModel/DraftModel or raw modules."""
    target = target if isinstance(target, TargetModel) else TargetModel(target)
    config = TreeConfig(method=method, budget=0 if method == "autoregressive" else budget, **tree_kw)
    search = None
    if method != "autoregressive":
        draft = draft if isinstance(draft, DraftModel) else DraftModel(draft)
        search = make_search(draft, config, params)
    link = InProcessVerifier(TargetSession(target, SessionConfig(params, config.rule, stop_ids)))
    return DraftSession(link, config, search, n, overlap=overlap, max_context=max_context,
                        auto_budget=auto_budget, stop_ids=stop_ids).generate(list(prompt))
