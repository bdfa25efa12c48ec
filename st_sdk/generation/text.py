"""Text out of ids: incremental detokenisation that never splits a character, and stop strings."""
from __future__ import annotations

from typing import Sequence


class IncrementalDecoder:
    """Turns a growing list of ids into text pieces, never splitting a UTF-8 character: a byte-level
    tokenizer decodes an incomplete character to U+FFFD, so a piece ending in it is held until the
    bytes that complete it arrive (the prefix/read-offset scheme of text-generation-inference)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0     # start of the window decoded for context
        self.read = 0       # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) < len(done):
            return ""           # an incomplete character: wait for its next bytes
        # move on even when nothing new was written (special tokens), so the window stays short
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """What is still held (an incomplete character at the very end decodes to U+FFFD)."""
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


class StopStrings:
    """Holds back text that may be the start of a stop string, so nothing of a stop string is ever
    emitted; reports the first complete occurrence."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, stopped)."""
        self.pending += piece
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:   # longest suffix of pending that is a proper prefix of some stop string
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

