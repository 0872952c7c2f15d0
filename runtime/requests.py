"""Request files for batch inference (`dualbrain generate OUT --batch REQUESTS.jsonl`).

One JSON object per line: exactly one of `prompt` (a user message, through the chat template),
`messages` (a list of {"role", "content"}) or `ids` (token ids), plus any of `max_new_tokens`,
`greedy`, `temperature`, `top_p`, `top_k`, `presence_penalty`, `seed`, `stop` (a string or a list of
them) and `think` (enable_thinking, default true). Anything else on a line, or a value of the wrong
type, is an error naming the line; a file with any bad line runs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualbrain.errors import DualbrainError, read_jsonl
from dualbrain.runtime.sampling import SamplingParams, default_params

PROMPT_FIELDS = ("prompt", "messages", "ids")
PARAM_FIELDS = ("max_new_tokens", "greedy", "temperature", "top_p", "top_k", "presence_penalty", "seed", "stop")
FIELDS = PROMPT_FIELDS + PARAM_FIELDS + ("think",)


@dataclass(frozen=True)
class RequestSpec:
    line: int
    prompt: str | None = None
    messages: list | None = None
    ids: list[int] | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    think: bool = True

    def params(self, generation_config: dict | None) -> SamplingParams:
        try:
            return default_params(generation_config, self.think).replace(**dict(self.overrides))
        except DualbrainError as e:
            raise DualbrainError(f"line {self.line}: {e}") from None

    def prompt_ids(self, model) -> list[int]:
        try:
            if self.ids is not None:
                return list(self.ids)          # checked against the vocabulary at Engine.submit
            msgs = [{"role": "user", "content": self.prompt}] if self.prompt is not None else self.messages
            tok = model.tokenizer
            return tok.encode(tok.render(msgs, enable_thinking=self.think))
        except DualbrainError as e:
            raise DualbrainError(f"line {self.line}: {e}") from None


def parse_request(d: Any, line: int) -> RequestSpec:
    def bad(msg: str) -> DualbrainError:
        return DualbrainError(f"line {line}: {msg}")

    if not isinstance(d, dict):
        raise bad("a request must be a JSON object")
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise bad(f"unknown field {unknown[0]!r} (a request has {', '.join(FIELDS)})")
    given = [k for k in PROMPT_FIELDS if k in d]
    if len(given) != 1:
        raise bad("give exactly one of prompt, messages or ids")
    kw: dict[str, Any] = {}
    if "prompt" in d:
        if not isinstance(d["prompt"], str):
            raise bad("prompt must be a string")
        kw["prompt"] = d["prompt"]
    elif "messages" in d:
        m = d["messages"]
        if not isinstance(m, list) or not m or not all(isinstance(x, dict) and isinstance(x.get("role"), str)
                                                     for x in m):
            raise bad('messages must be a non-empty list of {"role", "content"} objects')
        kw["messages"] = m
    else:
        ids = d["ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool)
                                                         for i in ids):
            raise bad("ids must be a non-empty list of integers")
        kw["ids"] = ids
    if "think" in d and not isinstance(d["think"], bool):
        raise bad("think must be true or false")
    overrides = {k: d[k] for k in PARAM_FIELDS if k in d}
    if "stop" in overrides:
        stop = overrides["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop must be a string or a list of non-empty strings")
        overrides["stop"] = tuple(stop)
    spec = RequestSpec(line=line, overrides=tuple(overrides.items()), think=d.get("think", True), **kw)
    spec.params(None)            # bad sampling values are refused here, before anything loads
    return spec


def read_requests(path: str | Path) -> list[RequestSpec]:
    """Every request of a JSONL file (blank lines skipped); the first bad line is an error."""
    specs = [parse_request(d, n) for n, d in read_jsonl(path, "requests file")]
    if not specs:
        raise DualbrainError(f"requests file {path} has no requests")
    return specs
