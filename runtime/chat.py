"""Runtime tokenizer and chat-template rendering (no torch / transformers).

* `Tokenizer.from_dir(path)` reads ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``
  and ``generation_config.json`` when present) with the `tokenizers` library.
* `render_chat(template, messages, ...)` renders a Jinja chat template exactly like transformers'
  ``apply_chat_template(..., tokenize=False)``: an `ImmutableSandboxedEnvironment` with ``trim_blocks`` /
  ``lstrip_blocks``, the ``loopcontrols`` extension and transformers' ``raise_exception`` / ``tojson`` /
  ``strftime_now`` / ``namespace`` helpers. Template errors (including sandbox violations) and malformed
  messages raise `DualbrainError` with a one-line message.
* `StreamDecoder` turns a stream of token ids into text deltas without ever splitting a multi-byte
  UTF-8 character.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from dualbrain.errors import DualbrainError, read_json_object
from dualbrain.runtime.spec import eos_token_ids

# Names a message's reasoning may be passed under; the first is the one chat templates read
# (transformers aliases them the same way).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_REPLACEMENT_CHAR = "\ufffd"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------
# Chat template rendering
# ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Like transformers: no HTML escaping, and the usual json.dumps options.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # Reject dunder/underscore attributes so templates cannot reach CPython internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})"
                )

    class _StrictSandbox(ImmutableSandboxedEnvironment):
        # Jinja's sandbox turns an unsafe attribute access into an Undefined that renders as "" when only
        # printed; refuse it outright instead (stricter than transformers, identical for sane templates).
        def unsafe_undefined(self, obj, attribute):
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
            )

    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)


def _plain(value: Any, where: str) -> Any:
    """Copy `value` as plain JSON data (what a template may see); anything else is a user error."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    raise DualbrainError(f"{where}: unsupported value of type {type(value).__name__} (only JSON data)")


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check `messages` is a list of {"role": str, "content": str, ...} dicts; return a plain copy.

    Reasoning given as ``thinking``/``reasoning`` is aliased to ``reasoning_content`` (as transformers does).
    """
    if not isinstance(messages, (list, tuple)):
        raise DualbrainError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise DualbrainError(
                f"message {i} must be a dict with 'role' and 'content', got {type(msg).__name__}"
            )
        for key in ("role", "content"):
            if key not in msg:
                raise DualbrainError(f"message {i} has no {key!r}")
            if not isinstance(msg[key], str):
                raise DualbrainError(f"message {i}: {key!r} must be a string, got {type(msg[key]).__name__}")
        for key in _REASONING_FIELDS:
            if msg.get(key) is not None and not isinstance(msg[key], str):
                raise DualbrainError(f"message {i}: {key!r} must be a string, got {type(msg[key]).__name__}")
        if msg.get("tool_calls") is not None and not isinstance(msg["tool_calls"], (list, tuple)):
            raise DualbrainError(f"message {i}: 'tool_calls' must be a list")
        plain = _plain(msg, f"message {i}")
        reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        out.append(plain)
    if not out:
        raise DualbrainError("messages is empty")
    return out


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = True,
    preserve_thinking: bool = False,
    **kwargs: Any,
) -> str:
    """Render `messages` with the Jinja chat `template` (same output as transformers' apply_chat_template).

    Extra keyword arguments (``tools``, ``bos_token``, ...) are passed to the template as variables.
    """
    import jinja2

    if not isinstance(template, str) or not template:
        raise DualbrainError("no chat template (expected a non-empty Jinja template string)")
    msgs = validate_messages(messages)
    variables = _plain(kwargs, "chat template variables")
    try:
        compiled = _compile(template)
        return compiled.render(
            messages=msgs,
            add_generation_prompt=bool(add_generation_prompt),
            enable_thinking=bool(enable_thinking),
            preserve_thinking=bool(preserve_thinking),
            **variables,
        )
    except jinja2.exceptions.SecurityError as e:
        raise DualbrainError(f"chat template refused by the sandbox: {_one_line(e)}") from e
    except jinja2.exceptions.TemplateError as e:
        raise DualbrainError(f"chat template error: {_one_line(e)}") from e
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        raise DualbrainError(f"chat template failed: {type(e).__name__}: {_one_line(e)}") from e


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------
def _token_content(tok: Any) -> str | None:
    if tok is None:
        return None
    if isinstance(tok, str):
        return tok
    if isinstance(tok, Mapping):  # serialized AddedToken
        return tok.get("content")
    return None


class Tokenizer:
    """Byte-level BPE tokenizer from a checkpoint / export directory (wraps `tokenizers.Tokenizer`)."""

    def __init__(
        self,
        backend: Any,
        *,
        chat_template: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        bos_token: str | None = None,
        extra_eos_ids: Iterable[int] = (),
    ):
        self._tok = backend
        self.chat_template = chat_template
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.bos_token = bos_token
        self.eos_token_id = self.token_to_id(eos_token) if eos_token else None
        self.pad_token_id = self.token_to_id(pad_token) if pad_token else None
        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_ids: tuple[int, ...] = eos_token_ids(self.eos_token_id, [int(i) for i in extra_eos_ids])
        added = backend.get_added_tokens_decoder()
        self.added_tokens: dict[str, int] = {t.content: i for i, t in added.items()}
        self.special_ids: dict[str, int] = {t.content: i for i, t in added.items() if t.special}

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        from tokenizers import Tokenizer as _Backend

        d = Path(path)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise DualbrainError(f"no tokenizer.json in {d}")
        try:
            backend = _Backend.from_file(str(tj))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise DualbrainError(f"cannot load {tj}: {_one_line(e)}") from e
        cfg = read_json_object(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = d / "chat_template.jinja"
        if jinja_file.is_file():  # transformers >= 4.43 writes the template here and prefers it
            template = jinja_file.read_text(encoding="utf-8")
        gen = d / "generation_config.json"
        extra_eos = eos_token_ids(read_json_object(gen).get("eos_token_id")) if gen.is_file() else ()
        return cls(
            backend,
            chat_template=template if isinstance(template, str) else None,
            eos_token=_token_content(cfg.get("eos_token")),
            pad_token=_token_content(cfg.get("pad_token")),
            bos_token=_token_content(cfg.get("bos_token")),
            extra_eos_ids=extra_eos,
        )

    # -- basic API ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids (BPE vocabulary plus added tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in the text are recognised, none are inserted."""
        if not isinstance(text, str):
            raise DualbrainError(f"encode expects a string, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def is_eos(self, token_id: int) -> bool:
        return int(token_id) in self.eos_ids

    def render(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
        """`render_chat` with this tokenizer's chat template (and its special tokens as variables)."""
        if not self.chat_template:
            raise DualbrainError("this tokenizer has no chat template")
        for name in ("bos_token", "eos_token", "pad_token"):
            if getattr(self, name) is not None:
                kwargs.setdefault(name, getattr(self, name))
        return render_chat(self.chat_template, messages, **kwargs)

    # -- identity: what makes two tokenizers mean the same by every id ---------------------------
    def identity(self) -> dict[str, str]:
        """sha256 of each part that decides what ids mean: the vocabulary, the BPE merges and the
        added tokens (chat templates, file layout and formatting are not part of it)."""
        import hashlib

        model = json.loads(self._tok.to_str()).get("model", {})
        added = sorted((i, t.content, bool(t.special)) for i, t in self._tok.get_added_tokens_decoder().items())
        parts = {"vocabulary": sorted(self._tok.get_vocab(with_added_tokens=False).items()),
                 "merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
                 "added tokens": added}
        return {k: hashlib.sha256(json.dumps(v, ensure_ascii=False).encode()).hexdigest() for k, v in parts.items()}

    def fingerprint(self) -> str:
        """One sha256 over `identity()`."""
        import hashlib

        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()

    def difference(self, other: "Tokenizer") -> str:
        """The parts of `identity()` in which the two differ, comma-separated ("" if none)."""
        a, b = self.identity(), other.identity()
        return ", ".join(k for k in a if a[k] != b[k])

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: `push(token_id)` returns the new text (possibly ""), never half a character.

    Uses the prefix/read-offset scheme: text is only emitted once the decoded tail no longer ends in an
    incomplete UTF-8 sequence (U+FFFD). `flush()` returns whatever is still held back (at end of stream).
    Concatenating all deltas plus `flush()` equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # end of the text already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT_CHAR):
            delta = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            return delta
        return ""

    def extend(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]


__all__ = ["Tokenizer", "StreamDecoder", "render_chat", "validate_messages"]
