"""Tokenizer fingerprint: both sides must map ids to the same strings, or output is garbage."""

from __future__ import annotations

import hashlib


def vocab_fingerprint(vocab: dict[str, int]) -> str:
    """SHA-256 over the (token, id) pairs in id order."""
    digest = hashlib.sha256()
    for token, idx in sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])):
        digest.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    return vocab_fingerprint(tokenizer.get_vocab())
