"""Training data: read a dataset file (local or s3://), check every row, tokenize it for the task.

All problems with the data surface here as a DataError naming the file, the row, the column and
what was expected, before any model is loaded or a step is trained. Files are read whole into
memory (the farm's fine-tuning sets are small) so each row can be checked and pointed at exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from farm.errors import DataError

if TYPE_CHECKING:
    import datasets

    from farm.manifest import DatasetSpec

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant")
MAX_REPORTED = 10  # row problems listed in one error; the rest are counted


@dataclass
class PreparedData:
    """Tokenized train/eval sets plus lineage stats, ready for the training loop."""

    train: datasets.Dataset
    """input_ids, attention_mask, labels (per-token with -100 on masked tokens; an int for seq_cls)."""
    eval: datasets.Dataset
    """Same columns as train."""
    stats: dict = field(default_factory=dict)
    """{"train": {source, sha256, rows, tokens, ...}, "eval": {...}} for farm.json."""
    label_names: list[str] | None = None
    """seq_cls: class names in id order."""


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class _Table:
    source: str
    sha256: str
    rows: list[dict]
    where: list[str]  # per row: "line 7" (jsonl) or "row 7"
    columns: list[str]


def storage_options(url: str) -> dict:
    """fsspec options for a URL (farm.settings owns where the S3 endpoint comes from)."""
    from farm.settings import storage_options as options

    return options(url)


def _read_bytes(source: str) -> bytes:
    import fsspec

    try:
        with fsspec.open(source, "rb", **storage_options(source)) as fh:
            return fh.read()
    except FileNotFoundError:
        raise DataError(f"{source}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{source}: is a directory, expected a .jsonl, .json, .parquet or .csv file") from None
    except Exception as exc:  # noqa: BLE001 - permissions, network, credentials: all "cannot read"
        raise DataError(f"{source}: cannot read the file ({type(exc).__name__}: {exc})") from None


def _kind(source: str) -> str:
    path = source.split("?", 1)[0].lower()
    for ext in ("jsonl", "json", "parquet", "csv"):
        if path.endswith("." + ext):
            return ext
    raise DataError(f"{source}: unknown file type; expected .jsonl, .json, .parquet or .csv")


def _parse_jsonl(source: str, text: str) -> tuple[list[dict], list[str]]:
    rows, where = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}: line {n}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{source}: line {n}: expected a JSON object per line, got {type(obj).__name__}")
        rows.append(obj)
        where.append(f"line {n}")
    return rows, where


def _parse(source: str, data: bytes) -> tuple[list[dict], list[str]]:
    kind = _kind(source)
    if kind in ("jsonl", "json"):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{source}: not UTF-8 text (byte {exc.start}); is it really {kind}?") from None
        if kind == "json" and text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{source}: line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            bad = next((i for i, x in enumerate(items, 1) if not isinstance(x, dict)), None)
            if bad is not None:
                raise DataError(f"{source}: row {bad}: expected a JSON object, got {type(items[bad - 1]).__name__}")
            return items, [f"row {i}" for i in range(1, len(items) + 1)]
        return _parse_jsonl(source, text)  # .json holding JSON lines, as `datasets` also accepts
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(io.BytesIO(data))
        else:
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise DataError(f"{source}: cannot read as {kind} ({type(exc).__name__}: {exc})") from None
    rows = table.to_pylist()
    return rows, [f"row {i}" for i in range(1, len(rows) + 1)]


def read_table(source: str) -> _Table:
    """Read a whole data file; its sha256 is taken over the exact bytes read."""
    if not source or not source.strip():
        raise DataError("dataset path is empty")
    _kind(source)
    data = _read_bytes(source)
    if not data.strip():
        raise DataError(f"{source}: the file is empty")
    rows, where = _parse(source, data)
    if not rows:
        raise DataError(f"{source}: the file has no rows")
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    return _Table(source, hashlib.sha256(data).hexdigest(), rows, where, list(columns))


# ---------------------------------------------------------------------------------------------
# Formats


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
    if spec.messages_column in cols:
        return "chat"
    if {spec.prompt_column, spec.completion_column} <= cols:
        return "prompt_completion"
    if spec.text_column in cols:
        return "text"
    raise DataError(
        "cannot tell the format from the columns: expected "
        f"{spec.messages_column!r} (chat), {spec.prompt_column!r} + {spec.completion_column!r} "
        f"(prompt_completion) or {spec.text_column!r} (text) (columns found: {', '.join(columns)})"
    )


def _required_columns(fmt: str, spec: DatasetSpec) -> list[str]:
    return {
        "text": [spec.text_column],
        "prompt_completion": [spec.prompt_column, spec.completion_column],
        "chat": [spec.messages_column],
        "classification": [spec.text_column, spec.label_column],
    }[fmt]


class _Problems:
    """Collects row problems so a file's errors are reported together."""

    def __init__(self, source: str):
        self.source, self.items, self.count = source, [], 0

    def add(self, where: str, column: str, message: str) -> None:
        self.count += 1
        if len(self.items) < MAX_REPORTED:
            self.items.append(f"{where}: column {column!r}: {message}")

    def raise_if_any(self) -> None:
        if not self.count:
            return
        more = self.count - len(self.items)
        lines = [f"{self.source}: {self.count} bad row{'s' if self.count != 1 else ''}"]
        lines += [f"  - {p}" for p in self.items]
        if more:
            lines.append(f"  ... and {more} more")
        raise DataError("\n".join(lines))


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _check_str(p: _Problems, where: str, col: str, v: Any, *, allow_empty: bool = True) -> None:
    if not isinstance(v, str):
        p.add(where, col, f"must be a string (got {_type_name(v)})")
    elif not allow_empty and not v:
        p.add(where, col, "must not be empty")


def _check_messages(p: _Problems, where: str, col: str, msgs: Any) -> None:
    if not isinstance(msgs, list) or not msgs:
        got = _type_name(msgs) if not isinstance(msgs, list) else "an empty list"
        p.add(where, col, f"must be a non-empty list of {{role, content}} messages (got {got})")
        return
    for i, m in enumerate(msgs, 1):
        if not isinstance(m, dict):
            p.add(where, col, f"message {i} must be an object with role and content (got {_type_name(m)})")
            return
        role = m.get("role")
        if role not in CHAT_ROLES:
            p.add(where, col, f"message {i}: role must be one of {', '.join(CHAT_ROLES)} (got {role!r})")
            return
        if not isinstance(m.get("content"), str):
            p.add(where, col, f"message {i}: content must be a string (got {_type_name(m.get('content'))})")
            return
        if "weight" in m and (role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool)):
            p.add(where, col, f"message {i}: weight must be 0 or 1, on assistant messages only (got {m['weight']!r})")
            return
    if not any(m["role"] == "assistant" for m in msgs):
        p.add(where, col, "has no assistant message; loss is computed on assistant turns only")


def _messages(v: Any) -> Any:
    """Messages as stored; a CSV cell can hold them as a JSON string."""
    if isinstance(v, str) and v.lstrip().startswith("["):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def _label_ids(table: _Table, col: str, labels: list[str] | None, num_labels: int | None, p: _Problems) -> list[int]:
    ids: list[int] = []
    for row, where in zip(table.rows, table.where):
        v = row.get(col)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, str) and labels is not None:
            if v in labels:
                ids.append(labels.index(v))
                continue
            p.add(where, col, f"label {v!r} is not in the label set (allowed: {', '.join(labels)})")
        elif isinstance(v, int) and not isinstance(v, bool):
            n = len(labels) if labels is not None else num_labels
            if 0 <= v < n:  # type: ignore[operator]
                ids.append(v)
                continue
            p.add(where, col, f"label id {v} is out of range (allowed: 0..{n - 1})")  # type: ignore[operator]
        elif isinstance(v, str):
            found = sorted({r.get(col) for r in table.rows if isinstance(r.get(col), str)})
            shown = ", ".join(found[:20]) + (", ..." if len(found) > 20 else "")
            p.add(
                where,
                col,
                f"string label {v!r} needs the manifest's `labels: [...]` to map it to an id "
                f"(num_labels alone allows int ids 0..{num_labels - 1}; string labels found: {shown})",  # type: ignore[operator]
            )
        else:
            p.add(where, col, f"must be a class name (string) or an int id (got {_type_name(v)})")
        ids.append(-1)
    return ids


# ---------------------------------------------------------------------------------------------
# Tokenizing


def _tokenize(
    table: _Table, fmt: str, spec: DatasetSpec, tokenizer, max_seq_len: int, labels, num_labels
) -> tuple[dict[str, list], int]:
    """Check every row, then tokenize. Returns (columns, rows dropped for having no trainable tokens)."""
    p = _Problems(table.source)
    rows, where = table.rows, table.where
    for col in _required_columns(fmt, spec):
        if col not in table.columns:
            raise DataError(
                f"{table.source}: missing column {col!r} needed by format {fmt} "
                f"(columns found: {', '.join(table.columns)})"
            )
    if fmt in ("text", "classification"):
        for r, w in zip(rows, where):
            _check_str(p, w, spec.text_column, r.get(spec.text_column))
    elif fmt == "prompt_completion":
        for r, w in zip(rows, where):
            _check_str(p, w, spec.prompt_column, r.get(spec.prompt_column))
            _check_str(p, w, spec.completion_column, r.get(spec.completion_column), allow_empty=False)
    elif fmt == "chat":
        for r, w in zip(rows, where):
            r[spec.messages_column] = _messages(r.get(spec.messages_column))
            _check_messages(p, w, spec.messages_column, r[spec.messages_column])
    label_ids = _label_ids(table, spec.label_column, labels, num_labels, p) if fmt == "classification" else None
    p.raise_if_any()

    eos = tokenizer.eos_token_id
    input_ids: list[list[int]] = []
    label_col: list = []
    if fmt == "text":
        enc = tokenizer([r[spec.text_column] for r in rows])["input_ids"]
        for ids in enc:
            ids = _with_eos(ids, eos)[:max_seq_len]
            input_ids.append(ids)
            label_col.append(list(ids))
    elif fmt == "prompt_completion":
        prompts = tokenizer([r[spec.prompt_column] for r in rows])["input_ids"]
        completions = tokenizer([r[spec.completion_column] for r in rows], add_special_tokens=False)["input_ids"]
        for pr, co in zip(prompts, completions):
            co = _with_eos(co, eos)
            ids = (pr + co)[:max_seq_len]
            input_ids.append(ids)
            label_col.append(([IGNORE_INDEX] * len(pr) + co)[:max_seq_len])
    elif fmt == "chat":
        _check_template(tokenizer, table.source)
        for r, w in zip(rows, where):
            try:
                out = tokenizer.apply_chat_template(
                    r[spec.messages_column], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
                )
            except Exception as exc:  # noqa: BLE001 - templates raise their own errors (e.g. "no system role")
                raise DataError(
                    f"{table.source}: {w}: column {spec.messages_column!r}: the tokenizer's chat template "
                    f"rejected these messages ({type(exc).__name__}: {exc})"
                ) from None
            ids = list(out["input_ids"])[:max_seq_len]
            mask = _weighted_mask(list(out["assistant_masks"]), r[spec.messages_column])[:max_seq_len]
            input_ids.append(ids)
            label_col.append([t if m else IGNORE_INDEX for t, m in zip(ids, mask)])
    else:  # classification
        enc = tokenizer([r[spec.text_column] for r in rows], truncation=True, max_length=max_seq_len)["input_ids"]
        input_ids = [list(ids) for ids in enc]
        label_col = label_ids  # type: ignore[assignment]

    if fmt == "classification":
        keep = [i for i, ids in enumerate(input_ids) if ids]
    else:
        keep = [i for i, lab in enumerate(label_col) if any(t != IGNORE_INDEX for t in lab)]
    if not keep:
        why = {
            "prompt_completion": f"every prompt fills max_seq_len={max_seq_len} tokens, so no completion token is left",
            "chat": f"no assistant token is left within max_seq_len={max_seq_len} tokens",
        }.get(fmt, "every row is empty")
        raise DataError(f"{table.source}: no trainable tokens left after truncation: {why}")
    columns = {
        "input_ids": [input_ids[i] for i in keep],
        "attention_mask": [[1] * len(input_ids[i]) for i in keep],
        "labels": [label_col[i] for i in keep],
    }
    return columns, len(rows) - len(keep)


def _weighted_mask(mask: list[int], messages: list[dict]) -> list[int]:
    """Drop the assistant turns marked `weight: 0` (OpenAI's chat format) from the loss mask. The
    template's generation blocks appear in message order, one run of 1s per assistant turn."""
    weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
    if all(w == 1 for w in weights):
        return mask
    out, turn, prev = list(mask), -1, 0
    for i, m in enumerate(mask):
        if m and not prev:
            turn += 1
        if m and turn < len(weights) and weights[turn] == 0:
            out[i] = 0
        prev = m
    return out


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    ids = list(ids)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def _check_template(tokenizer, source: str) -> None:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError(f"{source}: chat data needs a tokenizer with a chat template; this base model's has none")
    text = template if isinstance(template, str) else json.dumps(template)
    if "generation" not in text:
        raise DataError(
            f"{source}: the tokenizer's chat template has no {{% generation %}} markers, so assistant "
            "turns cannot be found for the loss mask; use a template with them, or format prompt_completion"
        )


def pack(columns: dict[str, list], max_seq_len: int) -> dict[str, list]:
    """Greedy packing: examples, whole and in order, fill max_seq_len blocks; label masks are kept."""
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    for ids, labels in zip(columns["input_ids"], columns["labels"]):
        if cur_ids and len(cur_ids) + len(ids) > max_seq_len:
            out["input_ids"].append(cur_ids)
            out["labels"].append(cur_labels)
            cur_ids, cur_labels = [], []
        cur_ids = cur_ids + ids
        cur_labels = cur_labels + labels
    if cur_ids:
        out["input_ids"].append(cur_ids)
        out["labels"].append(cur_labels)
    out["attention_mask"] = [[1] * len(x) for x in out["input_ids"]]
    return out


# ---------------------------------------------------------------------------------------------
# Entry point


def split_rows(table: _Table, fraction: float, seed: int) -> tuple[_Table, _Table]:
    """A seeded train/eval split of a table's rows (file order kept within each side)."""
    n = len(table.rows)
    n_eval = max(1, round(n * fraction))
    if n - n_eval < 1:
        raise DataError(
            f"{table.source}: eval_fraction={fraction:g} of {n} row{'s' if n != 1 else ''} leaves 0 rows "
            "for training; give more rows or a separate eval file"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])

    def take(idx: list[int], source: str) -> _Table:
        return _Table(source, table.sha256, [table.rows[i] for i in idx], [table.where[i] for i in idx], table.columns)

    eval_source = f"{table.source}#eval_fraction={fraction:g},seed={seed}"
    return take(train_idx, table.source), take(eval_idx, eval_source)


def prepare_data(
    spec: DatasetSpec,
    *,
    task: str,
    tokenizer,
    max_seq_len: int,
    seed: int,
    labels: list[str] | None = None,
    num_labels: int | None = None,
    packing: bool = False,
) -> PreparedData:
    """Read, check and tokenize train and eval data for a task (causal_lm or seq_cls).

    Raises DataError naming the file, row, column and what is expected for any bad input.
    """
    import datasets

    if task not in ("causal_lm", "seq_cls"):
        raise DataError(f"task must be causal_lm or seq_cls (got {task!r})")
    if task == "seq_cls":
        if labels is None and num_labels is None:
            raise DataError("task seq_cls needs labels (class names) or num_labels from the manifest")
        if spec.format not in ("auto", "classification"):
            raise DataError(f"format {spec.format!r} cannot train task seq_cls; use classification")
        if packing:
            raise DataError("packing is only possible with task causal_lm")
    elif spec.format == "classification":
        raise DataError("format classification needs task seq_cls")

    train = read_table(spec.train)
    fmt = spec.format if spec.format != "auto" else detect_format(train.columns, spec, task)
    if spec.eval:
        train_t, eval_t = train, read_table(spec.eval)
    else:
        train_t, eval_t = split_rows(train, spec.eval_fraction, seed)

    stats: dict[str, dict] = {}
    sets = {}
    for name, table in (("train", train_t), ("eval", eval_t)):
        cols, dropped = _tokenize(table, fmt, spec, tokenizer, max_seq_len, labels, num_labels)
        rows = len(cols["input_ids"])
        tokens = sum(len(x) for x in cols["input_ids"])
        if fmt == "classification":
            trainable = rows
        else:
            trainable = sum(sum(t != IGNORE_INDEX for t in lab) for lab in cols["labels"])
        entry = {
            "source": table.source,
            "sha256": table.sha256,
            "format": fmt,
            "rows": rows,
            "tokens": tokens,
            "trainable_tokens": trainable,
            "dropped": dropped,
        }
        if packing and name == "train":
            cols = pack(cols, max_seq_len)
            entry["sequences"] = len(cols["input_ids"])
        stats[name] = entry
        sets[name] = datasets.Dataset.from_dict(cols)

    label_names = None
    if task == "seq_cls":
        label_names = list(labels) if labels is not None else [str(i) for i in range(num_labels or 0)]
    return PreparedData(train=sets["train"], eval=sets["eval"], stats=stats, label_names=label_names)


class Collator:
    """Right-pads a list of tokenized rows into tensors: input_ids with pad_token_id, attention_mask
    with 0 and per-token labels with -100; an int label per row (seq_cls) becomes a 1-D tensor."""

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None):
        # Padded positions are masked by attention_mask and labels, so any id works if the
        # tokenizer has no pad token.
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def padded(key: str, value: int) -> torch.Tensor:
            return torch.tensor([list(f[key]) + [value] * (width - len(f[key])) for f in features], dtype=torch.long)

        batch = {"input_ids": padded("input_ids", self.pad_token_id), "attention_mask": padded("attention_mask", 0)}
        if "labels" in features[0]:
            if isinstance(features[0]["labels"], (list, tuple)):
                batch["labels"] = padded("labels", IGNORE_INDEX)
            else:
                batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch
