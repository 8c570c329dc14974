"""Composition: load the pair, build a drafter session against a verifier, run a prompt."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from specexec.drafter.draft_model import DraftModel
from specexec.drafter.quantize import int8_supported, quantize_int8
from specexec.drafter.budget_tuner import BudgetTuners
from specexec.drafter.session import DraftSession, GenerationResult, RunOptions
from specexec.drafter.tree_search import TreeConfig, TreeSearch
from specexec.launch import model_store
from specexec.launch.packed_linear import pack_linears
from specexec.verifier.layer_streamer import LayerStreamer
from specexec.verifier.placement import Placement
from specexec.protocol.link import VerifierLink
from specexec.protocol.sampling import SamplingParams
from specexec.verifier.inprocess import InProcessVerifier
from specexec.verifier.session import SessionConfig, TargetSession
from specexec.verifier.target_model import TargetModel

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


AUTO_SIZES = (1, 4, 16, 32, 64, 128, 256)  # forward sizes the budget tuner interpolates between


def report(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def target_curve(target: TargetModel, path: str, placement: str = "cpu", sizes=AUTO_SIZES) -> dict[int, float]:
    """The target's forward cost per size, measured once per (model, dtype, placement, threads)."""
    from specexec.launch.profile_cache import cached_curve, profile_key
    from specexec.verifier.profile import forward_curve
    key = profile_key(path, target.dtype, placement, sizes=list(sizes), bus=target.simulate_bus_gbps)
    return cached_curve("target", key, lambda: forward_curve(target, sizes))


def draft_curve(draft: DraftModel, path: str) -> dict[int, float]:
    from specexec.drafter.draft_profile import SIZES, draft_curve as measure
    from specexec.launch.profile_cache import cached_curve, profile_key
    return cached_curve("draft", profile_key(path, draft.weights, "cpu", sizes=list(SIZES)), lambda: measure(draft))


def resolve_dtype(name: str, path: str, device: str = "cpu") -> torch.dtype:
    """`auto`: the checkpoint's bf16 where `device` computes bf16 natively, else float32.

    On a CPU without AVX-512 (e.g. AVX2 only) PyTorch emulates bf16 matrix products at about
    1 GFLOP/s against 17-116 GFLOP/s in float32, so there `auto` means float32 (twice the memory).
    """
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    from transformers import AutoConfig
    stored = getattr(AutoConfig.from_pretrained(path), "dtype", None)
    if stored not in (torch.bfloat16, "bfloat16"):
        return torch.float32
    return torch.bfloat16 if computes_bf16(device) else torch.float32


def computes_bf16(device: str) -> bool:
    """Whether `device` runs bf16 matrix products natively (oneDNN's own check on a CPU)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def load_causal_lm(path: str, dtype: torch.dtype, pack: bool = True, **placement) -> torch.nn.Module:
    """Load a checkpoint for inference; CPU linears get pre-packed weights (`packed_linear`)."""
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                     **placement)
    except OSError as err:
        raise model_store.ModelStoreError(f"cannot load model {path}: {err}") from err
    if pack and not placement:
        pack_linears(model)
    return model.eval()


DRAFT_DTYPES = ("auto", "int8", "bfloat16", "float32")


def resolve_draft_dtype(draft_dtype: str, dtype: str, path: str) -> str:
    """`auto`: int8 weights where this CPU runs them (the draft only proposes), else like --dtype."""
    if draft_dtype not in DRAFT_DTYPES:
        raise ValueError(f"unknown draft dtype {draft_dtype!r}; expected one of {', '.join(DRAFT_DTYPES)}")
    if draft_dtype == "int8" and not int8_supported():
        raise ValueError("--draft-dtype int8: this PyTorch build or CPU has no fast int8 linear "
                         f"(quantized engine {torch.backends.quantized.engine!r}); use float32 or bfloat16")
    if draft_dtype == "auto":
        return "int8" if int8_supported() else str(resolve_dtype(dtype, path)).removeprefix("torch.")
    return draft_dtype


def load_draft(path: str, dtype: str = "auto", draft_dtype: str = "auto") -> DraftModel:
    """The draft model for this CPU: int8 linears, or packed float32/bf16 ones."""
    chosen = resolve_draft_dtype(draft_dtype, dtype, path)
    if chosen == "int8":
        model = load_causal_lm(path, torch.float32, pack=False)
        quantize_int8(model)
    else:
        model = load_causal_lm(path, DTYPES[chosen])
    return DraftModel(model, weights=chosen)


def load_target(path: str, dtype: str, placement: Placement) -> torch.nn.Module:
    """The target, placed: on one device, spread by accelerate (memory caps, disk), or streamed."""
    kwargs = placement.load_kwargs()
    on_cpu = not kwargs and placement.offload == "none"
    model = load_causal_lm(path, resolve_dtype(dtype, path, placement.compute_device), pack=on_cpu, **kwargs)
    if placement.offload == "stream":
        LayerStreamer(model, placement.compute_device)
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise model_store.ModelStoreError(f"cannot load the tokenizer of {path}: {err}") from err


def stop_ids(tokenizer, model) -> frozenset[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


def encode_chat(tokenizer, messages: list[dict], chat_template: str | None = None) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                        chat_template=chat_template or None)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def encode_prompt(tokenizer, text: str, chat: bool | None, chat_template: str | None = None) -> list[int]:
    """Token ids for `text`; chat=None uses the chat template when there is one."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if chat is None:
        chat = bool(template)
    if chat:
        if not template:
            raise ValueError("--chat: this tokenizer has no chat template; use --raw")
        return encode_chat(tokenizer, [{"role": "user", "content": text}], template)
    return tokenizer(text)["input_ids"]


def draft_session(link: VerifierLink, draft: DraftModel | None, tuners: BudgetTuners, options: RunOptions,
                  context: str | None, max_context: int | None, session_id: str | None = None) -> DraftSession:
    """The drafter's loop for one run over `link`: the method's tree search and --budget auto's choice."""
    search = None
    if options.tree.method != "autoregressive":
        if draft is None:
            raise ValueError(f"method {options.tree.method} needs a draft model")
        search = TreeSearch(draft, options.tree, options.sampling)
    return DraftSession(link, options.tree, search, options.max_new_tokens, overlap=options.overlap,
                        session_id=session_id, auto_budget=tuners.for_run(options, context),
                        max_context=max_context)


class LocalPipeline:
    """Draft and target in this process; models stay loaded between prompts."""

    def __init__(self, target_path: str, draft_path: str | None, dtype: str = "auto",
                 simulate_bus_gbps: float | None = None, placement: Placement = Placement(),
                 draft_dtype: str = "auto"):
        self.target_path, self.draft_path, self.placement = target_path, draft_path, placement
        self.tokenizer = load_tokenizer(target_path)
        target = load_target(target_path, dtype, placement)
        self.target = TargetModel(target, simulate_bus_gbps)
        self.stop_ids = stop_ids(self.tokenizer, target)
        self.draft = None
        if draft_path is not None:
            self.draft = load_draft(draft_path, dtype, draft_dtype)
            if self.draft.vocab_size != self.target.vocab_size:
                raise ValueError(f"draft vocabulary ({self.draft.vocab_size}) differs from the "
                                 f"target's ({self.target.vocab_size}): not a usable pair")
        self.tuners = BudgetTuners(
            lambda: target_curve(self.target, self.target_path, self.placement.describe()),
            lambda: draft_curve(self.draft, self.draft_path), report)

    def encode(self, text: str, chat: bool | None) -> list[int]:
        return encode_prompt(self.tokenizer, text, chat)

    def generate(self, prompt_ids: list[int], options: RunOptions,
                 on_tokens: Callable[[list[int]], None] | None = None, context: str | None = None
                 ) -> GenerationResult:
        """One continuation; `context` lets `--budget auto` keep its choice across related prompts."""
        session = TargetSession(self.target, SessionConfig(options.sampling, options.tree.rule,
                                                           self.stop_ids))
        drafter = draft_session(InProcessVerifier(session), self.draft, self.tuners, options, context,
                                self.target.max_context)
        return drafter.generate(prompt_ids, on_tokens)
