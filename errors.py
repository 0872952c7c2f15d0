"""The one user-facing exception type.

Anything a user can cause (bad paths, bad checkpoints, bad parameters) raises `DualbrainError`;
the CLI prints its message on one line and exits with code 2. Internal bugs stay ordinary
exceptions with tracebacks.
"""


class DualbrainError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


def read_json_object(path, what: str | None = None) -> dict:
    """Read a JSON object from `path`; anything wrong is a one-line DualbrainError naming the file."""
    import json
    from pathlib import Path

    path = Path(path)
    what = what or path.name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DualbrainError(f"missing {what} ({path})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DualbrainError(f"invalid {what} in {path.parent}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise DualbrainError(f"invalid {what} in {path.parent}: not a JSON object")
    return data


def read_jsonl(path, what: str):
    """(line number, parsed value) for each non-blank line of a JSONL file; an unreadable file or a
    line that is not JSON is a one-line DualbrainError naming `what`, the file and the line."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DualbrainError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DualbrainError(f"cannot read {what} {path}: {e}") from None
    out = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            try:
                out.append((n, json.loads(raw)))
            except json.JSONDecodeError as e:
                raise DualbrainError(f"line {n}: not valid JSON ({e.msg})") from None
    return out
