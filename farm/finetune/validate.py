"""Checking an uploaded training file line by line, the way OpenAI's file processing does.

A file is one JSON object per line, in one of three formats: chat (`{"messages": [...]}`, roles
system/user/assistant, at least one assistant turn, an assistant `weight` of 0 or 1),
prompt/completion (`{"prompt": str, "completion": str}`) or preference, for method dpo (OpenAI's
`{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}],
"non_preferred_output": [...]}`: one assistant message each, different, non-empty). The first bad line is reported with what is
wrong. Lines are read and messages checked by farm.rows, the rules the trainer applies too, so a
processed file does not fail later in training.
"""

from __future__ import annotations

from dataclasses import dataclass

from farm.rows import RowError, json_lines, message_problem, preference_problems, response_text

PREFERENCE_FIELDS = ("input.messages", "preferred_output", "non_preferred_output")


@dataclass(frozen=True)
class FileCheck:
    ok: bool
    format: str | None = None  # "chat" | "prompt_completion" | "preference"
    lines: int = 0
    details: str | None = None  # the first problem: "line 3: ..."
    text_chars: int = 0  # characters of trainable/prompt text (for token estimates)


def _chat_problem(obj: dict) -> tuple[str | None, int]:
    problem = message_problem(obj.get("messages"))
    if problem:
        return f"'messages' {problem}" if problem.startswith("must") else problem, 0
    return None, sum(len(m["content"]) for m in obj["messages"])


def _pc_problem(obj: dict) -> tuple[str | None, int]:
    if not isinstance(obj.get("prompt"), str):
        return "'prompt' must be a string", 0
    if not isinstance(obj.get("completion"), str) or not obj["completion"]:
        return "'completion' must be a non-empty string", 0
    return None, len(obj["prompt"]) + len(obj["completion"])


def _preference_problem(obj: dict) -> tuple[str | None, int]:
    inp = obj.get("input")
    if not isinstance(inp, dict) or "messages" not in inp:
        return "'input' must be an object with 'messages' (the conversation before the responses)", 0
    for name in PREFERENCE_FIELDS[1:]:
        if not isinstance(obj.get(name), list):  # OpenAI's form: a list of one assistant message, not a string
            return f"'{name}' must be a list of one assistant message [{{\"role\": \"assistant\", \"content\": ...}}]", 0
    problems = preference_problems(inp["messages"], obj["preferred_output"], obj["non_preferred_output"],
                                   names=PREFERENCE_FIELDS)
    if problems:
        field, problem = problems[0]
        return f"'{field}' {problem}", 0
    chars = sum(len(m["content"]) for m in inp["messages"])
    return None, chars + sum(len(response_text(obj[n]) or "") for n in PREFERENCE_FIELDS[1:])


def check_file(data: bytes) -> FileCheck:
    """Check a whole JSONL file; the format is set by its first line (every line must match it)."""
    fmt, lines, chars = None, 0, 0
    try:
        for n, obj in json_lines(data):
            if fmt is None:
                if "messages" in obj:
                    fmt = "chat"
                elif "input" in obj or "preferred_output" in obj or "non_preferred_output" in obj:
                    fmt = "preference"
                elif "prompt" in obj or "completion" in obj:
                    fmt = "prompt_completion"
                else:
                    return FileCheck(False, details=f"line {n}: no 'messages' (chat format), no 'prompt'/'completion' "
                                                    "and no 'input'/'preferred_output'/'non_preferred_output' (preference)")
            if fmt == "chat" and "messages" not in obj:
                return FileCheck(False, details=f"line {n}: no 'messages' (line 1 set the chat format)")
            check = {"chat": _chat_problem, "preference": _preference_problem}.get(fmt, _pc_problem)
            problem, c = check(obj)
            if problem:
                return FileCheck(False, details=f"line {n}: {problem}")
            lines += 1
            chars += c
    except RowError as exc:  # not UTF-8, not JSON, not an object: the first such line
        return FileCheck(False, details=str(exc))
    if not lines:
        return FileCheck(False, details="the file is empty: no JSON lines")
    return FileCheck(True, format=fmt, lines=lines, text_chars=chars)
