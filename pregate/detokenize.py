"""Incremental detokenization: the text of a growing token sequence, never re-decoding the whole of it.

A character can span several tokens (byte-level BPE splits emoji, CJK and many symbols into byte
tokens), so decoding only the newest token gives U+FFFD for half a character. vLLM's rule, used here:
decode a short window of recent tokens twice, once up to the tokens already turned into text and once
with the new ones; the text added is the difference. While that difference ends in an incomplete byte
sequence (U+FFFD), it is held back until the character completes. The window keeps each step O(1) and
still gives tokenizers that drop a leading space at the start of a decode (SentencePiece) their context.

Contract: after `finish()`, `text` equals `tokenizer.decode(token_ids, skip_special_tokens=True)` for
byte-level and SentencePiece tokenizers alike (tests check emoji, CJK and combining characters).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # tokens of context before the newest ones; enough for a leading-space rule


class IncrementalDetokenizer:
    """Text of generated tokens, grown one call per step. `text` holds only complete characters."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; returns the text they complete (possibly empty while a character is partial)."""
        self.token_ids.extend(token_ids)
        before = self._decode(self.token_ids[self._prefix : self._read])
        after = self._decode(self.token_ids[self._prefix :])
        if after.endswith(REPLACEMENT) or len(after) <= len(before):
            return ""  # an incomplete character (or a token with no text yet): wait for more tokens
        new = after[len(before) :]
        self.text += new
        self._read = len(self.token_ids)
        self._prefix = max(0, self._read - CONTEXT_TOKENS)
        return new

    def finish(self) -> str:
        """The text still held back at the end (an incomplete character decodes as U+FFFD, as offline)."""
        full = self._decode(self.token_ids)  # once per sequence: the exact offline text
        new = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += new
        self._read = len(self.token_ids)
        return new
