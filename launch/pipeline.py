"""The one place the drafter and the verifier meet in one process (`--in-process`), and the
`Pipeline` interface that this local pipeline and the drafter's remote one both implement.

Everything that runs generations (`generate`, `chat`, `bench`, the HTTP server, the Python
API) talks to a `Pipeline` and never asks which kind it holds.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from specexec.drafter.budget_tuner import BudgetTuners
from specexec.drafter.draft_model import DraftModel
from specexec.drafter.session import GenerationResult, RunOptions
from specexec.launch.drafting import check_pair, draft_curve, draft_session, load_draft
from specexec.launch.loading import encode_chat, encode_prompt, load_tokenizer, report, stop_ids
from specexec.launch.options import ModelOptions, PlacementOptions
from specexec.launch.serving import load_target, make_placement, target_curve
from specexec.verifier.inprocess import InProcessVerifier
from specexec.verifier.session import SessionConfig, TargetSession, prefill_chunk
from specexec.verifier.target_model import TargetModel


@runtime_checkable
class Pipeline(Protocol):
    """A draft model and a verifier, loaded once, generating one prompt at a time."""

    tokenizer: object
    stop_ids: frozenset[int]
    chat_template: str | None  # the target's, where the verifier sent one
    draft: DraftModel | None
    target_model: torch.nn.Module | None  # the target itself, when it lives in this process
    offloaded: bool  # the target streams its weights every pass: the default budget is OFFLOADED_BUDGET

    def encode(self, text: str, chat: bool | None) -> list[int]:
        """Prompt ids for `text` (chat=None: through the chat template when there is one)."""

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids for a conversation, ending with the assistant's turn to speak."""

    def generate(self, prompt_ids: list[int], options: RunOptions,
                 on_tokens: Callable[[list[int]], None] | None = None, context: str | None = None
                 ) -> GenerationResult:
        """One continuation; tokens are passed to `on_tokens` as rounds accept them."""

    def close(self) -> None:
        """Free what the pipeline holds."""


class LocalPipeline:
    """Draft and target in this process; models stay loaded between prompts."""

    def __init__(self, target_path: str, draft_path: str | None, models: ModelOptions = ModelOptions(),
                 placement: PlacementOptions = PlacementOptions(), simulate_bus_gbps: float | None = None):
        self.target_path, self.draft_path = target_path, draft_path
        self.placement = make_placement(placement)
        self.tokenizer = load_tokenizer(target_path)
        self.target_model = load_target(target_path, models.dtype, self.placement)
        self.target = TargetModel(self.target_model, simulate_bus_gbps)
        self.stop_ids = stop_ids(self.tokenizer, self.target_model)
        self.chat_template = getattr(self.tokenizer, "chat_template", None)
        self.draft = load_draft(draft_path, models.dtype, models.draft_dtype) if draft_path is not None else None
        check_pair(self.draft, self.target.vocab_size)
        self.tuners = BudgetTuners(
            lambda: target_curve(self.target, self.target_path, self.placement.describe()),
            lambda: draft_curve(self.draft, self.draft_path), report)

    @property
    def offloaded(self) -> bool:
        return self.target.offloaded

    def encode(self, text: str, chat: bool | None) -> list[int]:
        return encode_prompt(self.tokenizer, text, chat)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.tokenizer, messages, self.chat_template)

    def generate(self, prompt_ids: list[int], options: RunOptions,
                 on_tokens: Callable[[list[int]], None] | None = None, context: str | None = None
                 ) -> GenerationResult:
        """One continuation; `context` lets `--budget auto` keep its choice across related prompts."""
        config = SessionConfig(options.sampling, options.tree.rule, self.stop_ids, prefill_chunk(self.offloaded))
        session = TargetSession(self.target, config)
        drafter = draft_session(InProcessVerifier(session), self.draft, self.tuners, options, context,
                                self.target.max_context, self.stop_ids, offloaded=self.offloaded)
        return drafter.generate(prompt_ids, on_tokens)

    def close(self) -> None:
        """The models are freed with the pipeline."""
