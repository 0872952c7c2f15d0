"""Streamed text split into sections by an opening and a closing tag (`<think>`…`</think>`,
`<tool_call>`…`</tool_call>`), never fooled by a tag split across chunks: a chunk's tail that could be the
start of the tag it waits for is held back until the next chunk (or `flush`) decides.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Piece:
    inside: bool          # between the tags
    text: str
    ends: bool = False    # a tag follows this piece: the section ends here


class Sections:
    def __init__(self, open_tag: str, close_tag: str, *, inside: bool = False):
        self.tags = {False: open_tag, True: close_tag}
        self.inside = inside
        self._held = ""

    def feed(self, text: str) -> list[Piece]:
        buf, out = self._held + text, []
        while True:
            tag = self.tags[self.inside]
            at = buf.find(tag)
            if at < 0:
                break
            out.append(Piece(self.inside, buf[:at], ends=True))
            buf, self.inside = buf[at + len(tag):], not self.inside
        keep = _partial_tag(buf, self.tags[self.inside])
        self._held = buf[len(buf) - keep:] if keep else ""
        out.append(Piece(self.inside, buf[:len(buf) - keep]))
        return [p for p in out if p.text or p.ends]

    def flush(self) -> list[Piece]:
        """What was held back (the stream ended: a partial tag is text after all)."""
        held, self._held = self._held, ""
        return [Piece(self.inside, held)] if held else []


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
