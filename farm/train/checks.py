"""Row checks of training data: the format implied by the columns, each format's rules per row, and
the problem list that reports a file's bad rows together (file, row, column, what is allowed).

Each check sees one row at a time, so data.py can stream a file through them; the one message that
needs a whole side (string labels without `labels:` lists the labels found) is formed at the end.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from farm.errors import DataError
from farm.rows import message_problem, preference_problems

if TYPE_CHECKING:
    from farm.manifest import DatasetSpec

MAX_REPORTED = 10  # row problems listed in one error; the rest are counted
OPENAI_PREFERENCE = ("input", "preferred_output", "non_preferred_output")
"""OpenAI's preference JSONL (method dpo): read as prompt = input.messages, chosen, rejected."""


def detect_format(columns: list[str], spec: DatasetSpec, task: str) -> str:
    """The format implied by the columns (format: auto); a DataError says which columns were expected."""
    cols = set(columns)
    if task == "seq_cls":
        if {spec.text_column, spec.label_column} <= cols:
            return "classification"
        raise DataError(
            f"expected columns {spec.text_column!r} and {spec.label_column!r} for task seq_cls "
            f"(columns found: {', '.join(columns)})"
        )
    if {spec.prompt_column, spec.chosen_column, spec.rejected_column} <= cols or set(OPENAI_PREFERENCE) <= cols:
        return "preference"
    if spec.messages_column in cols:
        return "chat"
    if {spec.prompt_column, spec.completion_column} <= cols:
        return "prompt_completion"
    if spec.text_column in cols:
        return "text"
    raise DataError(
        "cannot tell the format from the columns: expected "
        f"{spec.messages_column!r} (chat), {spec.prompt_column!r} + {spec.completion_column!r} "
        f"(prompt_completion), {spec.text_column!r} (text) or {spec.prompt_column!r} + {spec.chosen_column!r} + "
        f"{spec.rejected_column!r} (preference) (columns found: {', '.join(columns)})"
    )


def required_columns(fmt: str, spec: DatasetSpec) -> list[str]:
    return {
        "text": [spec.text_column],
        "prompt_completion": [spec.prompt_column, spec.completion_column],
        "chat": [spec.messages_column],
        "classification": [spec.text_column, spec.label_column],
        "preference": [spec.prompt_column, spec.chosen_column, spec.rejected_column],
    }[fmt]


class Problems:
    """Collects row problems so a file's errors are reported together."""

    def __init__(self, source: str):
        self.source, self.count = source, 0
        self.items: list[tuple[str, str, str | Callable[[], str]]] = []

    def add(self, where: str, column: str, message: str | Callable[[], str]) -> None:
        """A problem; a callable message is formed at the end, when it needs the whole side."""
        self.count += 1
        if len(self.items) < MAX_REPORTED:
            self.items.append((where, column, message))

    def raise_if_any(self) -> None:
        if not self.count:
            return
        more = self.count - len(self.items)
        lines = [f"{self.source}: {self.count} bad row{'s' if self.count != 1 else ''}"]
        lines += [f"  - {w}: column {c!r}: {m() if callable(m) else m}" for w, c, m in self.items]
        if more:
            lines.append(f"  ... and {more} more")
        raise DataError("\n".join(lines))


def type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def check_str(p: Problems, where: str, col: str, v: Any, *, allow_empty: bool = True) -> None:
    if not isinstance(v, str):
        p.add(where, col, f"must be a string (got {type_name(v)})")
    elif not allow_empty and not v:
        p.add(where, col, "must not be empty")


def check_messages(p: Problems, where: str, col: str, msgs: Any) -> None:
    """A chat row's messages, by farm.rows' rules (the same the upload check applies)."""
    problem = message_problem(msgs)
    if problem:
        p.add(where, col, problem)


def openai_preference_row(spec: DatasetSpec, row: dict) -> dict:
    """An OpenAI preference line as the preference columns of `spec`."""
    inp = row.get("input")
    return {spec.prompt_column: inp.get("messages") if isinstance(inp, dict) else inp,
            spec.chosen_column: row.get("preferred_output"), spec.rejected_column: row.get("non_preferred_output")}


def check_preference(p: Problems, where: str, spec: DatasetSpec, row: dict) -> None:
    """A preference row (prompt, chosen, rejected) by farm.rows' rules (the same the upload check applies)."""
    names = (spec.prompt_column, spec.chosen_column, spec.rejected_column)
    for col, problem in preference_problems(*(row.get(c) for c in names), names=names):
        p.add(where, col, problem)


def parse_messages(v: Any) -> Any:
    """Messages as stored; a CSV cell can hold them as a JSON string."""
    if isinstance(v, str) and v.lstrip().startswith("["):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


class Labels:
    """Per-row label checks of one side (seq_cls). Remembers the 21 smallest distinct string labels of
    the side, which is what the message about string labels without `labels:` shows (20 and "...")."""

    def __init__(self, col: str, labels: list[str] | None, num_labels: int | None):
        self.col, self.labels, self.num_labels = col, labels, num_labels
        self.index = {name: i for i, name in enumerate(labels)} if labels is not None else None
        self.found: list[str] = []

    def _see(self, v: str) -> None:
        i = bisect.bisect_left(self.found, v)
        if i < len(self.found) and self.found[i] == v:
            return
        self.found.insert(i, v)
        del self.found[21:]

    def _shown(self) -> str:
        return ", ".join(self.found[:20]) + (", ..." if len(self.found) > 20 else "")

    def check(self, p: Problems, where: str, v: Any) -> int:
        """The row's label id, or -1 after adding a problem."""
        col, labels, num_labels = self.col, self.labels, self.num_labels
        if isinstance(v, str):
            self._see(v)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, str) and self.index is not None:
            if v in self.index:
                return self.index[v]
            p.add(where, col, f"label {v!r} is not in the label set (allowed: {', '.join(labels)})")  # type: ignore[arg-type]
        elif isinstance(v, int) and not isinstance(v, bool):
            n = len(labels) if labels is not None else num_labels
            if 0 <= v < n:  # type: ignore[operator]
                return v
            p.add(where, col, f"label id {v} is out of range (allowed: 0..{n - 1})")  # type: ignore[operator]
        elif isinstance(v, str):
            p.add(where, col, lambda v=v: (
                f"string label {v!r} needs the manifest's `labels: [...]` to map it to an id "
                f"(num_labels alone allows int ids 0..{num_labels - 1}; string labels found: {self._shown()})"  # type: ignore[operator]
            ))
        else:
            p.add(where, col, f"must be a class name (string) or an int id (got {type_name(v)})")
        return -1
