"""Token ids in, text out, as a stream: incremental detokenisation and stop strings matched on the text.

A token is not a unit of text: a byte-level BPE token can hold half of a UTF-8 character, and a stop
string can span several tokens ("\\n\\nUser" may arrive as "\\n", "\\nUs", "er"). So text is decoded
from a window of ids (vLLM's prefix/read offsets: the window's start gives the decoder its context)
and released only once it no longer ends in U+FFFD, the decoder's mark for an unfinished character;
the stop strings are then searched in the released text, holding back any tail that could still grow
into one. What the client sees is cut exactly before the first stop string, never inside a character.
"""

from __future__ import annotations

from collections.abc import Sequence

INCOMPLETE = "\ufffd"


class TextStream:
    """Feed token ids one by one (`push`); get the text safe to send now. `stopped` turns True at a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] were decoded and sent: the next window's context
        self.read_offset = 0
        self.held = ""  # decoded text not sent yet: it may be the start of a stop string
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; the text it completes that cannot be part of a stop string ('' if none yet)."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        if len(window) <= len(before) or window.endswith(INCOMPLETE):
            return ""  # nothing new, or it ends inside a character: wait for the next token
        new = window[len(before) :] if window.startswith(before) else window
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(self.held + new)

    def _release(self, text: str) -> str:
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.held = True, ""
            return text[:cut]
        keep = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The end of the answer: whatever is still held (an unfinished character is sent as U+FFFD)."""
        if self.stopped:
            return ""
        rest = self._decode(self.ids[self.prefix_offset :])
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        tail = rest[len(before) :] if rest.startswith(before) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        out = self._release(self.held + tail)
        out, self.held = out + self.held, ""
        return out
