"""Resolving and loading models, shared by both processes.

Names become local directories (`model_store` fetches the default pair), checkpoints become
eval-mode transformers models in the chosen dtype, tokenizers become prompt ids. Nothing here
knows about trees: the drafter's process wraps what it loads in a `DraftModel`
(`launch.drafting`), the verifier's in a `TargetModel` (`launch.serving`).
"""

from __future__ import annotations

import sys

import torch

from specexec.launch import model_store
from specexec.launch.packed_linear import pack_linears

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def report(message: str) -> None:
    """Progress and choices for the user, on stderr (stdout carries the generated text)."""
    print(message, file=sys.stderr, flush=True)


def resolve_dtype(name: str, path: str, device: str = "cpu") -> torch.dtype:
    """`auto`: the checkpoint's bf16 where `device` computes bf16 natively, else float32.

    On a CPU without AVX-512 (e.g. AVX2 only) PyTorch emulates bf16 matrix products at about
    1 GFLOP/s against 17-116 GFLOP/s in float32, so there `auto` means float32 (twice the memory).
    """
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if stored_dtype(path) != torch.bfloat16:
        return torch.float32
    return torch.bfloat16 if computes_bf16(device) else torch.float32


def stored_dtype(path: str) -> torch.dtype | None:
    """The dtype the checkpoint's weights are stored in (its config's), where it says."""
    from transformers import AutoConfig
    stored = getattr(AutoConfig.from_pretrained(path), "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else None


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
