"""Tiny causal LMs built from a config, for tests that must run in seconds."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

ARCHS = ("llama", "qwen2")


def tiny_lm(arch: str = "llama", vocab: int = 96, seed: int = 0, layers: int = 2, hidden: int = 64,
            init_range: float = 0.2) -> torch.nn.Module:
    """A random float32 model; a wide init keeps logits far apart, so argmax ties are rare."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, initializer_range=init_range,
                  tie_word_embeddings=False, attn_implementation="sdpa", eos_token_id=None,
                  bos_token_id=None, pad_token_id=None)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    return model.float().eval()


def perturbed(model: torch.nn.Module, noise: float, seed: int = 1) -> torch.nn.Module:
    """A draft for `model`: the same weights plus noise, so it agrees often but not always."""
    import copy
    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * p.std() * torch.randn_like(p))
    return draft.eval()


def greedy_reference(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """The target's own greedy continuation, one full forward per token (no cache)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt):]


CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}<assistant>"


def tiny_tokenizer(vocab: int = 96, chat: bool = True):
    """A word-level tokenizer over `vocab` words: w0 ... (w2 is the end-of-sequence token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {f"w{i}": i for i in range(vocab)}
    words.update({"<user>": 3, "<assistant>": 4})
    words = {w: i for w, i in words.items() if w not in ("w3", "w4")}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w2")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_pair(root, arch: str = "llama", vocab: int = 96):
    """Write a target and a draft directory (model + tokenizer), as `from_pretrained` expects."""
    import os
    target = tiny_lm(arch, vocab=vocab)
    draft = perturbed(target, 0.05)
    paths = {}
    for name, model in (("target", target), ("draft", draft)):
        path = os.path.join(str(root), name)
        model.generation_config.eos_token_id = 2
        model.save_pretrained(path)
        tiny_tokenizer(vocab).save_pretrained(path)
        paths[name] = path
    return paths, target
