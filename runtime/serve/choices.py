"""One choice of a response, built from the engine's `Delta`s and `Final`: each delta becomes a stream
chunk's choice, and everything is kept for the non-streaming response (the same text either way).
"""
from __future__ import annotations

from functools import lru_cache

from dualbrain.runtime.serve import protocol as P
from dualbrain.runtime.serve.output import ChatOutput, ChatPart
from dualbrain.runtime.serve.service import Delta, Final

# the engine's finish reasons as the API names them (a tool call turns "stop" into "tool_calls")
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


class TokenText:
    """Token ids as the text the API shows for them in logprobs."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = lru_cache(maxsize=65536)(self._text)

    def _text(self, token: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token}"
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def entry(self, token: int, logprob: float) -> P.TopLogprob:
        t = self.text(token)
        return P.TopLogprob(token=t, logprob=logprob, bytes=list(t.encode("utf-8")))


class _Choice:
    def __init__(self, index: int, token_text: TokenText, logprobs: bool, token_ids: bool):
        self.index = index
        self.token_text = token_text
        self.want_logprobs = logprobs
        self.want_ids = token_ids
        self.ids: list[int] = []
        self.logprobs: list = []
        self.final: Final | None = None

    def _take(self, d: Delta) -> None:
        self.ids += d.token_ids
        self.logprobs += d.logprobs or []

    @property
    def completion_tokens(self) -> int:
        return self.final.completion_tokens if self.final else len(self.ids)


class ChatChoice(_Choice):
    def __init__(self, index: int, output: ChatOutput, token_text: TokenText, *, logprobs: bool, token_ids: bool):
        super().__init__(index, token_text, logprobs, token_ids)
        self.output = output
        self.message = ChatPart()

    def delta(self, d: Delta) -> P.ChatChunkChoice | None:
        self._take(d)
        return self._chunk(self.output.feed(d.text), d)

    def finish(self, f: Final) -> P.ChatChunkChoice:
        self.final = f
        chunk = self._chunk(self.output.flush(), None, force=True)
        chunk.finish_reason = self.finish_reason
        return chunk

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.message.tool_calls and self.final.finish_reason != "length" \
            else FINISH[self.final.finish_reason]

    def _chunk(self, part: ChatPart, d: Delta | None, force: bool = False) -> P.ChatChunkChoice | None:
        first_call = len(self.message.tool_calls)
        self.message.reasoning += part.reasoning
        self.message.content += part.content
        self.message.tool_calls += part.tool_calls
        lps = self._logprobs(d.logprobs) if d is not None else None
        if not (part or lps or force or (d is not None and d.token_ids and self.want_ids)):
            return None
        calls = [P.ToolCallDelta(index=first_call + i, function=P.FunctionCall(name=n, arguments=a))
                 for i, (n, a) in enumerate(part.tool_calls)] or None
        return P.ChatChunkChoice(
            index=self.index, logprobs=lps, token_ids=d.token_ids if d is not None and self.want_ids else None,
            delta=P.ChatDelta(content=part.content or None, reasoning_content=part.reasoning or None,
                              tool_calls=calls))

    def _logprobs(self, items) -> P.ChatLogprobs | None:
        if not self.want_logprobs or not items:
            return None
        tt = self.token_text
        return P.ChatLogprobs(content=[
            P.TokenLogprob(**tt.entry(x.token, x.logprob).model_dump(),
                           top_logprobs=[tt.entry(i, lp) for i, lp in x.top])
            for x in items])

    def result(self) -> P.ChatChoice:
        m = self.message
        calls = [P.ToolCall(function=P.FunctionCall(name=n, arguments=a)) for n, a in m.tool_calls] or None
        return P.ChatChoice(
            index=self.index, finish_reason=self.finish_reason, logprobs=self._logprobs(self.logprobs),
            token_ids=self.ids if self.want_ids else None,
            message=P.ChatMessage(content=m.content if m.content or not calls else None,
                                  reasoning_content=m.reasoning or None, tool_calls=calls))


class CompletionChoice(_Choice):
    def __init__(self, index: int, token_text: TokenText, *, logprobs: bool, token_ids: bool,
                 prompt_ids: list[int]):
        super().__init__(index, token_text, logprobs, token_ids)
        self.prompt_ids = prompt_ids
        self.text = ""

    def delta(self, d: Delta) -> P.CompletionChoice | None:
        offset = len(self.text)
        self._take(d)
        self.text += d.text
        lps = self._logprobs(d.logprobs, offset)
        if not (d.text or lps or (d.token_ids and self.want_ids)):
            return None
        return P.CompletionChoice(index=self.index, text=d.text, logprobs=lps,
                                  token_ids=d.token_ids if self.want_ids else None)

    def finish(self, f: Final) -> P.CompletionChoice:
        self.final = f
        return P.CompletionChoice(index=self.index, text="", finish_reason=FINISH[f.finish_reason])

    def _logprobs(self, items, offset: int) -> P.CompletionLogprobs | None:
        if not self.want_logprobs or not items:
            return None
        out, tt = P.CompletionLogprobs(), self.token_text
        for x in items:
            t = tt.text(x.token)
            out.tokens.append(t)
            out.token_logprobs.append(x.logprob)
            out.top_logprobs.append({tt.text(i): lp for i, lp in x.top})
            out.text_offset.append(offset)
            offset += len(t)
        return out

    def result(self) -> P.CompletionChoice:
        return P.CompletionChoice(
            index=self.index, text=self.text, finish_reason=FINISH[self.final.finish_reason],
            logprobs=self._logprobs(self.logprobs, 0), token_ids=self.ids if self.want_ids else None,
            prompt_token_ids=self.prompt_ids if self.want_ids else None)
