"""One way to read a JSON Lines file: the upload check, the manifest preflight and the trainer agree.

Before farm.rows they did not: the upload check and the preflight split lines with `str.splitlines`
(which also splits at U+2028, U+0085, \\x1c-\\x1e and a lone \\r), the trainer split bytes at \\n. A file
whose strings hold a raw U+2028 (what `json.dumps(..., ensure_ascii=False)` writes) was refused at upload
and trained fine; a file with CR-only line endings passed the upload check and then failed in training.
"""

from __future__ import annotations

import json

import pytest

from farm.errors import DataError
from farm.finetune.validate import check_file
from farm.preflight import _sniff
from farm.rows import RowError, json_lines, message_problem
from farm.train import sources


def _chat(text: str, answer: str = "ok") -> dict:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]}


def _line(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


ODD = ["a\u2028b", "a\u2029b", "a\u0085b", "a\x1cb\x1dc\x1ed", "form\x0cfeed", "tab\there"]
GOOD = {
    "plain \\n": b"".join(_line(_chat(t)) + b"\n" for t in ("one", "two")),
    "CRLF": b"".join(_line(_chat(t)) + b"\r\n" for t in ("one", "two")),
    "BOM and no final newline": b"\xef\xbb\xbf" + _line(_chat("one")) + b"\n" + _line(_chat("two")),
    "blank lines": b"\n" + _line(_chat("one")) + b"\n  \n\r\n" + _line(_chat("two")) + b"\n\n",
    "separators inside strings": b"".join(_line(_chat(t)) + b"\n" for t in ODD),
}
BAD = {
    "CR-only line endings": (b"".join(_line(_chat(t)) + b"\r" for t in ("one", "two")), 1, "lone CR"),
    "a list on a line": (_line(_chat("one")) + b"\n[1, 2]\n", 2, "expected one JSON object per line, got a JSON list"),
    "not JSON": (_line(_chat("one")) + b"\n{oops\n", 2, "not JSON"),
    "not UTF-8": (_line(_chat("one")) + b"\n\xff\xfe\n", 2, "not UTF-8 text (byte"),
}


def _trainer_rows(path) -> list[dict]:
    return [row for _, row in sources.rows(sources.scan(str(path)))]


@pytest.mark.parametrize("name", list(GOOD))
def test_every_reader_takes_the_same_rows(tmp_path, name):
    data = GOOD[name]
    expected = [obj for _, obj in json_lines(data)]
    assert len(expected) == (len(ODD) if "separators" in name else 2)
    if "separators" in name:
        assert [r["messages"][0]["content"] for r in expected] == ODD  # never split inside a string
    check = check_file(data)
    assert check.ok and check.lines == len(expected) and check.format == "chat", check.details
    path = tmp_path / "train.jsonl"
    path.write_bytes(data)
    assert _sniff(str(path), data) is None
    assert _trainer_rows(path) == expected


@pytest.mark.parametrize("name", list(BAD))
def test_every_reader_refuses_the_same_line_with_the_same_reason(tmp_path, name):
    data, line, reason = BAD[name]
    with pytest.raises(RowError) as err:
        list(json_lines(data))
    assert err.value.line == line and reason in err.value.message
    check = check_file(data)
    assert not check.ok and check.details.startswith(f"line {line}: ") and reason in check.details
    path = tmp_path / "train.jsonl"
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        _trainer_rows(path)
    assert str(err.value).startswith(f"{path}: line {line}: ") and reason in str(err.value)
    if line == 1:  # the preflight sniff sees the first line only
        problem = _sniff(str(path), data)
        assert problem is not None and problem.startswith("line 1: ") and reason in problem


def test_the_sniff_judges_the_first_line_only_when_whole(tmp_path):
    from farm.preflight import _SNIFF_BYTES

    path = str(tmp_path / "train.jsonl")
    cut = b'\n\r\n{"a": 1}\r\n{"b": "' + b"x" * _SNIFF_BYTES
    assert _sniff(path, cut[:_SNIFF_BYTES]) is None  # first object whole; the cut one after it is not read
    assert _sniff(path, (b'{"a": ' + b"1" * _SNIFF_BYTES)[:_SNIFF_BYTES]) is None  # cut by the sniff: not judged
    assert _sniff(path, b'{"a": 1').startswith("line 1: not JSON")  # the whole file: judged as is
    assert _sniff(path, b"\n \n") == "the file is empty"


@pytest.mark.parametrize("msgs, problem", [
    ([], "must be a non-empty list of {role, content} messages (got an empty list)"),
    ("hi", "must be a non-empty list of {role, content} messages (got string)"),
    (["hi"], "message 1 must be an object with role and content (got string)"),
    ([{"role": "bot", "content": "x"}], "message 1: role must be one of system, user, assistant (got 'bot')"),
    ([{"role": "user", "content": 3}], "message 1 (user): content must be a string (got number)"),
    ([{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}],
     "message 1 (user): weight must be 0 or 1, on assistant messages only (got 1)"),
    ([{"role": "assistant", "content": "y", "weight": True}],
     "message 1 (assistant): weight must be 0 or 1, on assistant messages only (got True)"),
    ([{"role": "user", "content": "x"}], "has no assistant message; the loss is computed on assistant turns only"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}], None),
])
def test_one_message_rule_for_upload_and_trainer(msgs, problem):
    assert message_problem(msgs) == problem
    check = check_file(_line({"messages": msgs}) + b"\n")
    if problem is None:
        assert check.ok
    else:
        assert not check.ok and problem in check.details
