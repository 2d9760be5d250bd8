"""Checking an uploaded training file line by line, the way OpenAI's file processing does.

A file is one JSON object per line, in one of two formats: chat (`{"messages": [...]}`, roles
system/user/assistant, at least one assistant turn, an assistant `weight` of 0 or 1) or
prompt/completion (`{"prompt": str, "completion": str}`). The first bad line is reported with what is
wrong; the same rules as farm.train.data, so a processed file does not fail later in training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")  # what farm.train.data trains on


@dataclass(frozen=True)
class FileCheck:
    ok: bool
    format: str | None = None  # "chat" | "prompt_completion"
    lines: int = 0
    details: str | None = None  # the first problem: "line 3: ..."
    text_chars: int = 0  # characters of trainable/prompt text (for token estimates)


def _chat_problem(obj: dict) -> tuple[str | None, int]:
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list of {role, content} objects", 0
    chars, assistant = 0, False
    for i, m in enumerate(msgs, 1):
        if not isinstance(m, dict):
            return f"message {i} is not an object", 0
        role = m.get("role")
        if role not in ROLES:
            return f"message {i}: unknown role {role!r} (allowed: {', '.join(ROLES)})", 0
        content = m.get("content")
        if not isinstance(content, str):
            return f"message {i} ({role}): 'content' must be a string", 0
        if "weight" in m:
            if role != "assistant":
                return f"message {i} ({role}): 'weight' is only allowed on assistant messages", 0
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                return f"message {i}: 'weight' must be 0 or 1 (got {m['weight']!r})", 0
        assistant = assistant or role == "assistant"
        chars += len(content)
    if not assistant:
        return "no assistant message: the loss is computed on assistant turns", 0
    return None, chars


def _pc_problem(obj: dict) -> tuple[str | None, int]:
    if not isinstance(obj.get("prompt"), str):
        return "'prompt' must be a string", 0
    if not isinstance(obj.get("completion"), str) or not obj["completion"]:
        return "'completion' must be a non-empty string", 0
    return None, len(obj["prompt"]) + len(obj["completion"])


def check_file(data: bytes) -> FileCheck:
    """Check a whole JSONL file; the format is set by its first line (every line must match it)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return FileCheck(False, details=f"not UTF-8 text (byte {exc.start}); expected JSON lines")
    fmt, lines, chars = None, 0, 0
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            return FileCheck(False, details=f"line {n}: not JSON ({exc.msg} at column {exc.colno})")
        if not isinstance(obj, dict):
            return FileCheck(False, details=f"line {n}: expected a JSON object, got {type(obj).__name__}")
        if fmt is None:
            if "messages" in obj:
                fmt = "chat"
            elif "prompt" in obj or "completion" in obj:
                fmt = "prompt_completion"
            else:
                return FileCheck(False, details=f"line {n}: no 'messages' (chat format) and no 'prompt'/'completion'")
        if fmt == "chat" and "messages" not in obj:
            return FileCheck(False, details=f"line {n}: no 'messages' (line 1 set the chat format)")
        problem, c = _chat_problem(obj) if fmt == "chat" else _pc_problem(obj)
        if problem:
            return FileCheck(False, details=f"line {n}: {problem}")
        lines += 1
        chars += c
    if not lines:
        return FileCheck(False, details="the file is empty: no JSON lines")
    return FileCheck(True, format=fmt, lines=lines, text_chars=chars)
