"""Prompt lookup: continuations of the text's last few tokens found earlier in the text.

As llama.cpp's lookup decoding and transformers' prompt lookup do: take the longest suffix of
the committed sequence (up to `max_len` tokens) that occurred before, and propose what followed
its latest earlier occurrence. The index is updated as the text grows, so a lookup is a few
dictionary reads however long the text is.
"""

from __future__ import annotations


class PromptLookup:
    def __init__(self, max_len: int = 3):
        self.max_len = max_len
        self.text: list[int] = []
        self._ends: dict[tuple[int, ...], int] = {}  # n-gram -> end of its latest occurrence
        self._indexed = 0  # occurrences ending before this position are in the index

    def reset(self, tokens: list[int]) -> None:
        self.text, self._ends, self._indexed = [], {}, 0
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        self.text.extend(tokens)

    def _index(self) -> None:
        """Index every occurrence except the ones ending at the text's end (the suffix itself)."""
        text, stop = self.text, len(self.text) - 1
        for end in range(max(self._indexed, 1), stop + 1):
            for n in range(1, min(self.max_len, end) + 1):
                self._ends[tuple(text[end - n:end])] = end
        self._indexed = max(self._indexed, stop + 1)

    def propose(self, n_tokens: int) -> list[int]:
        """Up to `n_tokens` tokens that followed the longest earlier match of the text's suffix."""
        self._index()
        text = self.text
        for n in range(min(self.max_len, len(text) - 1), 0, -1):
            end = self._ends.get(tuple(text[-n:]))
            if end is not None:
                return text[end:end + n_tokens]
        return []
