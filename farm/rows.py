"""The rules of a training row, one owner: how JSON Lines are read and what a chat row must hold.

Three readers used to disagree (the upload check split with `str.splitlines`, the preflight sniff did
too, the trainer split bytes on "\\n"): a file whose strings hold U+2028 was refused at upload and
trained fine; a file with CR-only line endings passed the upload check and failed in training. All of
them now read through `json_lines` and check messages with `message_problem`:

* UTF-8, with an optional BOM at the very start;
* a line ends at "\\n" only; a "\\r" before it is dropped (CRLF files read the same). Never split at
  U+2028/U+2029, U+0085, \\x1c-\\x1e or a lone "\\r", which JSON strings may hold raw;
* blank lines are skipped; every other line is one JSON object;
* a file whose lines end in a lone "\\r" (old Mac endings) is refused, saying so.

Light on purpose (json only): farm.finetune, farm.preflight and farm.train all import it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

BOM = b"\xef\xbb\xbf"
CHAT_ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """One bad line of a JSON Lines file: `line` is 1-based, `message` says what is wrong and what is allowed."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line, self.message = line, message


def json_lines(lines: Iterable[bytes] | bytes) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; raises RowError at the first bad one.

    `lines` is the raw bytes of a whole file, or an iterable of its lines as a binary file object
    yields them (split at b"\\n" only, each with its b"\\n"), so a large file streams.
    """
    if isinstance(lines, bytes | bytearray):
        lines = io.BytesIO(lines)
    offset = 0
    for n, raw in enumerate(lines, start=1):
        start = offset
        offset += len(raw)
        if n == 1 and raw.startswith(BOM):
            raw, start = raw[len(BOM):], start + len(BOM)
        body = raw[:-1] if raw.endswith(b"\n") else raw
        body = body[:-1] if body.endswith(b"\r") else body
        if not body.strip():
            continue
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RowError(n, f"not UTF-8 text (byte {start + exc.start} of the file)") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            why = f"not JSON ({exc.msg} at column {exc.colno})"
            if "\r" in text.strip():
                why += "; the lines seem to end in a lone CR (\\r): JSON Lines end each line in \\n or \\r\\n"
            raise RowError(n, why) from None
        if not isinstance(obj, dict):
            raise RowError(n, f"expected one JSON object per line, got a JSON {_json_type(obj)}")
        yield n, obj


def message_problem(msgs: Any) -> str | None:
    """What is wrong with a chat row's messages (the first problem), or None.

    Allowed: a non-empty list of {role, content} objects, role one of system/user/assistant, content a
    string, `weight` 0 or 1 on assistant messages only, at least one assistant message (the loss is
    computed on assistant turns).
    """
    if not isinstance(msgs, list) or not msgs:
        got = "an empty list" if isinstance(msgs, list) else _json_type(msgs)
        return f"must be a non-empty list of {{role, content}} messages (got {got})"
    for i, m in enumerate(msgs, 1):
        if not isinstance(m, dict):
            return f"message {i} must be an object with role and content (got {_json_type(m)})"
        role = m.get("role")
        if role not in CHAT_ROLES:
            return f"message {i}: role must be one of {', '.join(CHAT_ROLES)} (got {role!r})"
        if not isinstance(m.get("content"), str):
            return f"message {i} ({role}): content must be a string (got {_json_type(m.get('content'))})"
        if "weight" in m and (role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool)):
            return f"message {i} ({role}): weight must be 0 or 1, on assistant messages only (got {m['weight']!r})"
    if not any(m["role"] == "assistant" for m in msgs):
        return "has no assistant message; the loss is computed on assistant turns only"
    return None


def _messages_problem(msgs: Any, *, need_assistant: bool) -> str | None:
    problem = message_problem(msgs)
    if problem and not need_assistant and problem.startswith("has no assistant message"):
        return None
    return problem


def response_text(v: Any) -> str | None:
    """A preference response as text: a string, or [{"role": "assistant", "content": ...}] (TRL's
    conversational form, OpenAI's preferred_output); None when it is neither."""
    if isinstance(v, str):
        return v
    if (isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict) and v[0].get("role") == "assistant"
            and isinstance(v[0].get("content"), str)):
        return v[0]["content"]
    return None


def preference_problems(prompt: Any, chosen: Any, rejected: Any,
                        names: tuple[str, str, str] = ("prompt", "chosen", "rejected")) -> list[tuple[str, str]]:
    """What is wrong with a preference row, as (field, problem) pairs (empty: nothing).

    Allowed: the prompt a non-empty string or a non-empty list of {role, content} chat messages (the
    conversation so far; it need not hold an assistant turn); each response a non-empty string or a
    list of one assistant message; the two responses different.
    """
    out = []
    p_name, c_name, r_name = names
    if isinstance(prompt, str):
        if not prompt.strip():
            out.append((p_name, "must not be empty"))
    else:
        problem = _messages_problem(prompt, need_assistant=False)
        if problem:
            out.append((p_name, f"must be a string or chat messages: {problem}"))
    texts = []
    for name, v in ((c_name, chosen), (r_name, rejected)):
        text = response_text(v)
        if text is None:
            out.append((name, "must be a string or a list of one assistant message {role: assistant, content} "
                              f"(got {_json_type(v) if not isinstance(v, list) else f'a list of {len(v)}'})"))
        elif not text.strip():
            out.append((name, "must not be empty: a preference pair needs both responses"))
        texts.append(text)
    if not out and texts[0] == texts[1]:
        out.append((r_name, f"is the same as {c_name!r}: a preference pair needs two different responses"))
    return out


def _json_type(v: Any) -> str:
    """A Python value's name as JSON calls it (what a user wrote in the file)."""
    if v is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}.get(
        type(v), type(v).__name__)
