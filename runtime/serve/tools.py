"""A model's tool-call block (the text between `<tool_call>` and `</tool_call>`) as a function call.

Two block formats, as the chat templates render them (and vLLM's parsers read them back):
- Qwen3.5 / Qwen3.6 (the published templates; vLLM's `qwen3_coder` parser), XML-like:
      <function=get_weather>
      <parameter=city>
      Paris
      </parameter>
      </function>
  A parameter's value is text; it is converted by the tool's JSON schema (a `string` stays text,
  anything else is read as JSON when it parses), as vLLM does.
- Qwen3 (and the tiny checkpoints' template; vLLM's `hermes` parser): `{"name": …, "arguments": {…}}`.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping

_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.S)


def parse_tool_call(block: str, tools: Mapping[str, Mapping[str, Any]]) -> tuple[str, str] | None:
    """(name, arguments as a JSON string), or None when `block` is neither format.
    `tools`: each offered function's name -> its `parameters` JSON schema."""
    for parse in (_parse_xml, _parse_json):
        call = parse(block, tools)
        if call is not None:
            return call
    return None


def _parse_xml(block: str, tools) -> tuple[str, str] | None:
    m = _FUNCTION.search(block)
    if m is None:
        return None
    name = m.group(1).strip()
    properties = (tools.get(name) or {}).get("properties") or {}
    args = {}
    for pm in _PARAMETER.finditer(m.group(2)):
        key = pm.group(1).strip()
        args[key] = _typed(_strip_one_newline(pm.group(2)), (properties.get(key) or {}).get("type"))
    return name, json.dumps(args, ensure_ascii=False)


def _strip_one_newline(text: str) -> str:
    # the template writes "<parameter=k>\n" + value + "\n</parameter>": the value is what is between
    text = text[1:] if text.startswith("\n") else text
    return text[:-1] if text.endswith("\n") else text


def _typed(value: str, schema_type) -> Any:
    if schema_type in (None, "string") or (isinstance(schema_type, list) and "string" in schema_type):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _parse_json(block: str, tools) -> tuple[str, str] | None:
    try:
        call = json.loads(block.strip())
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments", call.get("parameters", {}))
    return call["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
