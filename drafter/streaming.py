"""Incremental detokenization: turn accepted token ids into printable text as rounds land."""

from __future__ import annotations


class TextStream:
    """Decodes the growing id list and yields only the new, complete text.

    Decoding the whole continuation each time keeps multi-token characters and the tokenizer's
    spacing rules right; text ending in U+FFFD (an unfinished UTF-8 sequence) is held back.
    """

    def __init__(self, tokenizer, skip_ids: frozenset[int] = frozenset()):
        self.tokenizer = tokenizer
        self.skip_ids = skip_ids
        self.ids: list[int] = []
        self.printed = 0

    def push(self, tokens: list[int]) -> str:
        self.ids.extend(t for t in tokens if t not in self.skip_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        fresh, self.printed = text[self.printed:], len(text)
        return fresh

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)
