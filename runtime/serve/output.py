"""One chat choice's streamed text split the way the OpenAI API returns it, as vLLM's qwen3 reasoning and
tool parsers (and llama.cpp's) do:

- `<think>…</think>` -> `reasoning_content`, the rest -> `content`. When the prompt ends inside an open
  `<think>` (Qwen3.5's thinking template writes it), the output starts as reasoning and may carry only
  `</think>`. Newlines right after a tag are dropped (the template writes them; re-rendering adds them back).
- with tools offered, each `<tool_call>…</tool_call>` block in the content -> one tool call (tools.py),
  whitespace between blocks dropped; a block that does not parse stays in the content as text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from dualbrain.runtime.serve.sections import Piece, Sections
from dualbrain.runtime.serve.tools import parse_tool_call

THINK = ("<think>", "</think>")
TOOL_CALL = ("<tool_call>", "</tool_call>")


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether the rendered prompt leaves a `<think>` open for the model to continue."""
    return prompt.rfind(THINK[0]) > prompt.rfind(THINK[1])


@dataclass
class ChatPart:
    """What one stretch of output adds to a chat message."""
    reasoning: str = ""
    content: str = ""
    tool_calls: list[tuple[str, str]] = field(default_factory=list)    # (name, arguments JSON)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class ChatOutput:
    def __init__(self, *, thinking: bool, tools: Mapping[str, Mapping[str, Any]] | None):
        self.think = Sections(*THINK, inside=thinking)
        self.tools = tools
        self.blocks = Sections(*TOOL_CALL) if tools is not None else None
        self.calls = 0
        self._block = ""
        self._section_start = True        # no text yet since the last think tag: drop leading newlines

    def feed(self, text: str) -> ChatPart:
        return self._split(self.think.feed(text), final=False)

    def flush(self) -> ChatPart:
        return self._split(self.think.flush(), final=True)

    def _split(self, pieces, final: bool) -> ChatPart:
        part = ChatPart()
        for p in pieces:
            text = p.text.lstrip("\n") if self._section_start else p.text
            self._section_start = (self._section_start and not text) or p.ends
            if p.inside:
                part.reasoning += text
            else:
                self._content(part, self.blocks.feed(text) if self.blocks else [Piece(False, text)])
        if final and self.blocks:
            self._content(part, self.blocks.flush())
            if self._block or self.blocks.inside:          # an unclosed block is text after all
                part.content += TOOL_CALL[0] + self._block
                self._block = ""
        return part

    def _content(self, part: ChatPart, pieces) -> None:
        for p in pieces:
            if not p.inside:
                if not (self.calls and not p.text.strip()):
                    part.content += p.text
                continue
            self._block += p.text
            if p.ends:
                call = parse_tool_call(self._block, self.tools)
                if call is None:
                    part.content += TOOL_CALL[0] + self._block + TOOL_CALL[1]
                else:
                    part.tool_calls.append(call)
                    self.calls += 1
                self._block = ""
