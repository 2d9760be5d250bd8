"""Training data: check every row of a dataset (local or s3://) and tokenize it for the task.

All problems with the data surface as a DataError naming the file, the row, the column and what was
expected. Files are streamed (farm.train.sources), never held whole by these checks, so the driver
validates a job's data before any Ray work and keeps only counts:

- `check_data` (the driver, before training): streams every row through the checks and the
  tokenizer, keeps no rows or token ids, and returns a `DataSummary` (row counts, lineage stats for
  farm.json, label names).
- `load_prepared` (the Ray Train worker; also the packed-training worker): the same pass, keeping the
  tokenized rows as plain columns for the training loop.
- `prepare_data`: `load_prepared` as `datasets.Dataset`s, for notebooks, tests and benches.

The train/eval split (`eval_fraction`, no eval file) is seeded and keeps file order on each side;
it needs only the row count, so both sides stream from the same file.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from farm.errors import DataError
from farm.rows import response_text
from farm.train import sources
from farm.train.checks import (
    OPENAI_PREFERENCE,
    Labels,
    Problems,
    check_messages,
    check_preference,
    check_str,
    detect_format,
    openai_preference_row,
    parse_messages,
    required_columns,
)
from farm.train.sources import storage_options  # noqa: F401 - kept for callers that import it from here

if TYPE_CHECKING:
    import datasets

    from farm.manifest import DatasetSpec

IGNORE_INDEX = -100
TOKENIZE_BATCH = 256  # rows per tokenizer call: fast tokenizers batch, memory stays bounded


@dataclass
class DataSummary:
    """What the driver knows of a job's data after `check_data`: counts, never rows."""

    stats: dict
    """{"train": {source, sha256, format, rows, tokens, trainable_tokens, dropped[, sequences]}, "eval": {...}}."""
    label_names: list[str] | None
    """seq_cls: class names in id order."""
    train_rows: int
    """Training examples the loop steps over: packed sequences with packing, else rows."""


@dataclass
class LoadedData:
    """Tokenized train/eval rows as plain columns (input_ids, attention_mask, labels)."""

    train: dict[str, list]
    eval: dict[str, list]
    stats: dict
    label_names: list[str] | None = None


@dataclass
class PreparedData:
    """Tokenized train/eval sets plus lineage stats (`prepare_data`)."""

    train: datasets.Dataset
    """input_ids, attention_mask, labels (per-token with -100 on masked tokens; an int for seq_cls)."""
    eval: datasets.Dataset
    """Same columns as train."""
    stats: dict = field(default_factory=dict)
    """{"train": {source, sha256, rows, tokens, ...}, "eval": {...}} for farm.json."""
    label_names: list[str] | None = None
    """seq_cls: class names in id order."""


# ---------------------------------------------------------------------------------------------
# One side (train or eval): check every row, tokenize the good ones, count


@dataclass
class _Side:
    name: str
    source: str
    """As reported: the file, or `<file>#eval_fraction=...,seed=...` for the split-off eval rows."""
    scanned: sources.Scanned
    eval_mask: bytearray | None = None
    """Split mode: 1 for the rows of the eval side; this side takes rows where mask == want."""
    want: int = 0

    def rows(self) -> Iterator[tuple[str, dict]]:
        n = 0
        mask = self.eval_mask
        for where, row in sources.rows(self.scanned):
            if n >= self.scanned.n_rows:
                break
            if mask is None or mask[n] == self.want:
                yield where, row
            n += 1
        if n != self.scanned.n_rows:
            raise DataError(f"{self.scanned.source}: the file changed while it was read "
                            f"({self.scanned.n_rows} rows, then {n}); check the job again")


def split_mask(n: int, fraction: float, seed: int, source: str) -> bytearray:
    """The seeded eval split of n rows as a mask (1 = eval): the same rows for the same n and seed."""
    n_eval = max(1, round(n * fraction))
    if n - n_eval < 1:
        raise DataError(
            f"{source}: eval_fraction={fraction:g} of {n} row{'s' if n != 1 else ''} leaves 0 rows "
            "for training; give more rows or a separate eval file"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    mask = bytearray(n)
    for i in order[:n_eval]:
        mask[i] = 1
    return mask


class _Counts:
    """Stats of one side as examples arrive, plus the columns when kept (the worker) and the greedy
    packing's sequence count (the same rule as `pack`) when the side is packed."""

    def __init__(self, fmt: str, keep: bool, pack_len: int | None):
        self.fmt, self.keep, self.pack_len = fmt, keep, pack_len
        self.rows = self.tokens = self.trainable = self.dropped = self.sequences = 0
        self._cur = 0
        self.columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        if fmt == "preference":
            self.columns.update(rejected_input_ids=[], rejected_labels=[])

    def add(self, ids: list[int], label: Any) -> None:
        ok = bool(ids) if self.fmt == "classification" else any(t != IGNORE_INDEX for t in label)
        if not ok:
            self.dropped += 1
            return
        self.rows += 1
        self.tokens += len(ids)
        self.trainable += 1 if self.fmt == "classification" else sum(t != IGNORE_INDEX for t in label)
        if self.pack_len is not None:
            if self._cur and self._cur + len(ids) > self.pack_len:
                self.sequences += 1
                self._cur = 0
            self._cur += len(ids)
        if self.keep:
            self.columns["input_ids"].append(ids)
            self.columns["attention_mask"].append([1] * len(ids))
            self.columns["labels"].append(label)

    def add_pair(self, chosen: list[int], chosen_labels: list[int], rejected: list[int], rejected_labels: list[int]) -> None:
        """A preference pair: one example of two sequences (both count as tokens)."""
        self.rows += 1
        self.tokens += len(chosen) + len(rejected)
        self.trainable += sum(t != IGNORE_INDEX for t in chosen_labels) + sum(t != IGNORE_INDEX for t in rejected_labels)
        if self.keep:
            self.columns["input_ids"].append(chosen)
            self.columns["attention_mask"].append([1] * len(chosen))
            self.columns["labels"].append(chosen_labels)
            self.columns["rejected_input_ids"].append(rejected)
            self.columns["rejected_labels"].append(rejected_labels)

    def entry(self, side: _Side) -> dict:
        e = {"source": side.source, "sha256": side.scanned.sha256, "format": self.fmt, "rows": self.rows,
             "tokens": self.tokens, "trainable_tokens": self.trainable, "dropped": self.dropped}
        if self.pack_len is not None:
            e["sequences"] = self.sequences + (1 if self._cur else 0)
        return e


def _tokenize_batch(fmt: str, spec: DatasetSpec, tokenizer, max_seq_len: int, batch: list[tuple[str, dict, int]],
                    out: _Counts) -> None:
    eos = tokenizer.eos_token_id
    if fmt == "text":
        for ids in tokenizer([r[spec.text_column] for _, r, _ in batch])["input_ids"]:
            ids = _with_eos(ids, eos)[:max_seq_len]
            out.add(ids, list(ids))
    elif fmt == "prompt_completion":
        prompts = tokenizer([r[spec.prompt_column] for _, r, _ in batch])["input_ids"]
        completions = tokenizer([r[spec.completion_column] for _, r, _ in batch], add_special_tokens=False)["input_ids"]
        for pr, co in zip(prompts, completions):
            co = _with_eos(co, eos)
            out.add((pr + co)[:max_seq_len], ([IGNORE_INDEX] * len(pr) + co)[:max_seq_len])
    else:  # classification
        enc = tokenizer([r[spec.text_column] for _, r, _ in batch], truncation=True, max_length=max_seq_len)["input_ids"]
        for ids, (_, _, label) in zip(enc, batch):
            out.add(list(ids), label)


def _tokenize_chat(spec: DatasetSpec, tokenizer, max_seq_len: int, source: str, where: str, row: dict,
                   out: _Counts) -> None:
    msgs = row[spec.messages_column]
    try:
        enc = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    except Exception as exc:  # noqa: BLE001 - templates raise their own errors (e.g. "no system role")
        raise DataError(
            f"{source}: {where}: column {spec.messages_column!r}: the tokenizer's chat template "
            f"rejected these messages ({type(exc).__name__}: {exc})"
        ) from None
    ids = list(enc["input_ids"])[:max_seq_len]
    mask = _weighted_mask(list(enc["assistant_masks"]), msgs)[:max_seq_len]
    out.add(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)])


def _tokenize_preference(spec: DatasetSpec, tokenizer, max_seq_len: int, p: Problems, where: str, row: dict,
                         out: _Counts) -> None:
    """One pair, tokenized as TRL's DPOTrainer does: prompt, prompt+chosen and prompt+rejected each
    tokenized whole (chat messages through the chat template, the prompt with the generation prompt;
    plain text with EOS appended to each response), the responses starting where the tokenized
    prompt and prompt+response first differ; each sequence cut to max_seq_len from the end. A prompt
    that leaves no response token within max_seq_len is a row problem (TRL drops such rows)."""
    prompt = row[spec.prompt_column]
    chosen, rejected = (response_text(row[c]) for c in (spec.chosen_column, spec.rejected_column))
    if isinstance(prompt, list):
        def ids(msgs, **kw):
            return list(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, **kw)["input_ids"])
        try:
            prompt_ids = ids(prompt, add_generation_prompt=True)
            seqs = [ids(prompt + [{"role": "assistant", "content": r}]) for r in (chosen, rejected)]
        except Exception as exc:  # noqa: BLE001 - templates raise their own errors (e.g. "no system role")
            p.add(where, spec.prompt_column, f"the tokenizer's chat template rejected this conversation "
                                             f"({type(exc).__name__}: {exc})")
            return
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        seqs = [list(tokenizer(prompt + (r if r.endswith(eos) else r + eos))["input_ids"]) for r in (chosen, rejected)]
    start = min(len(os.path.commonprefix([prompt_ids, s])) for s in seqs)  # works on any sequences
    if start >= max_seq_len:
        p.add(where, spec.prompt_column, f"the prompt is {start} tokens, which leaves no room for the response "
                                         f"within max_seq_len={max_seq_len}; shorten it or raise training.max_seq_len")
        return
    pair = []
    for col, s in zip((spec.chosen_column, spec.rejected_column), seqs):
        if len(s) <= start:
            p.add(where, col, "tokenizes to nothing after the prompt")
            return
        s = s[:max_seq_len]
        pair += [s, [IGNORE_INDEX] * start + s[start:]]
    out.add_pair(*pair)


def _run_side(side: _Side, fmt: str, spec: DatasetSpec, tokenizer, max_seq_len: int, labels, num_labels, *,
              keep: bool, pack: bool) -> _Counts:
    """One streaming pass over a side. Errors come in the order a whole-file check gives them: row
    problems (all listed), then the chat template, then the first row the template rejects, then
    "no trainable tokens". Once a row is bad, the rest are only checked, not tokenized."""
    columns = side.scanned.columns
    # OpenAI's preference lines (input.messages, preferred_output, non_preferred_output), read as the columns
    openai_form = (fmt == "preference" and set(OPENAI_PREFERENCE) <= set(columns)
                   and spec.chosen_column not in columns)
    for col in (OPENAI_PREFERENCE if openai_form else required_columns(fmt, spec)):
        if col not in columns:
            raise DataError(
                f"{side.source}: missing column {col!r} needed by format {fmt} (columns found: {', '.join(columns)})"
            )
    p = Problems(side.source)
    lab = Labels(spec.label_column, labels, num_labels) if fmt == "classification" else None
    out = _Counts(fmt, keep, max_seq_len if pack else None)
    late: DataError | None = None  # the template's or a row's tokenization error, raised after row problems
    if fmt == "chat":
        try:
            _check_template(tokenizer, side.source)
        except DataError as exc:
            late = exc
    chat_prompts = False  # preference rows whose prompt is chat messages: the template must exist
    pending: list[tuple[str, dict, int]] = []

    def flush() -> None:
        if pending and not p.count and late is None:
            _tokenize_batch(fmt, spec, tokenizer, max_seq_len, pending, out)
        pending.clear()

    for where, r in side.rows():
        label = -1
        if fmt in ("text", "classification"):
            check_str(p, where, spec.text_column, r.get(spec.text_column))
        elif fmt == "prompt_completion":
            check_str(p, where, spec.prompt_column, r.get(spec.prompt_column))
            check_str(p, where, spec.completion_column, r.get(spec.completion_column), allow_empty=False)
        elif fmt == "preference":
            if openai_form:
                r = openai_preference_row(spec, r)
            r[spec.prompt_column] = parse_messages(r.get(spec.prompt_column))  # chat messages in a CSV cell
            check_preference(p, where, spec, r)
        else:
            r[spec.messages_column] = parse_messages(r.get(spec.messages_column))
            check_messages(p, where, spec.messages_column, r[spec.messages_column])
        if lab is not None:
            label = lab.check(p, where, r.get(spec.label_column))
        if p.count or late is not None:
            pending.clear()
            continue
        if fmt == "chat":
            try:
                _tokenize_chat(spec, tokenizer, max_seq_len, side.source, where, r, out)
            except DataError as exc:
                late = exc
            continue
        if fmt == "preference":
            if isinstance(r[spec.prompt_column], list) and not chat_prompts:
                if not getattr(tokenizer, "chat_template", None):
                    late = DataError(f"{side.source}: {where}: column {spec.prompt_column!r} holds chat messages, "
                                     "but this base model's tokenizer has no chat template; give the prompt as text")
                    continue
                chat_prompts = True
            _tokenize_preference(spec, tokenizer, max_seq_len, p, where, r, out)
            continue
        pending.append((where, r, label))
        if len(pending) >= TOKENIZE_BATCH:
            flush()
    flush()
    p.raise_if_any()
    if late is not None:
        raise late
    if not out.rows:
        why = {
            "prompt_completion": f"every prompt fills max_seq_len={max_seq_len} tokens, so no completion token is left",
            "chat": f"no assistant token is left within max_seq_len={max_seq_len} tokens",
            "preference": "no pair is left",
        }.get(fmt, "every row is empty")
        raise DataError(f"{side.source}: no trainable tokens left after truncation: {why}")
    return out


# ---------------------------------------------------------------------------------------------
# Entry points


def _plan(spec: DatasetSpec, task: str, seed: int, labels, num_labels, packing: bool,
          method: str = "sft") -> tuple[str, list[_Side]]:
    """Check the arguments, scan the files (one pass each), pick the format, split: the two sides."""
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

    train = sources.scan(spec.train)
    fmt = spec.format if spec.format != "auto" else detect_format(train.columns, spec, task)
    if method == "dpo" and fmt != "preference":
        raise DataError(f"{train.source}: method dpo trains on preference rows (columns {spec.prompt_column!r}, "
                        f"{spec.chosen_column!r}, {spec.rejected_column!r}); this file is format {fmt} "
                        f"(columns found: {', '.join(train.columns)})")
    if fmt == "preference" and method != "dpo":
        raise DataError(f"{train.source}: preference rows (prompt, chosen, rejected) train with method: dpo, "
                        f"not {method}")
    if fmt == "preference" and packing:
        raise DataError("packing is not possible with preference data")
    if spec.eval:
        return fmt, [_Side("train", train.source, train), _Side("eval", spec.eval, sources.scan(spec.eval))]
    mask = split_mask(train.n_rows, spec.eval_fraction, seed, train.source)
    eval_source = f"{train.source}#eval_fraction={spec.eval_fraction:g},seed={seed}"
    return fmt, [_Side("train", train.source, train, mask, 0), _Side("eval", eval_source, train, mask, 1)]


def _label_names(task: str, labels, num_labels) -> list[str] | None:
    if task != "seq_cls":
        return None
    return list(labels) if labels is not None else [str(i) for i in range(num_labels or 0)]


def check_data(spec: DatasetSpec, *, task: str, tokenizer, max_seq_len: int, seed: int,
               labels: list[str] | None = None, num_labels: int | None = None, packing: bool = False,
               method: str = "sft") -> DataSummary:
    """Check every row of train and eval data by streaming it (the driver, before training).

    Keeps no rows and no token ids, only counts: memory stays flat in the size of the data. Raises
    DataError naming the file, row, column and what is expected for any bad input; the errors and
    the stats are exactly those `load_prepared` gives for the same files.
    """
    fmt, sides = _plan(spec, task, seed, labels, num_labels, packing, method)
    stats = {}
    for side in sides:
        counts = _run_side(side, fmt, spec, tokenizer, max_seq_len, labels, num_labels,
                           keep=False, pack=packing and side.name == "train")
        stats[side.name] = counts.entry(side)
    n_train = stats["train"].get("sequences", stats["train"]["rows"])
    return DataSummary(stats, _label_names(task, labels, num_labels), n_train)


def load_prepared(spec: DatasetSpec, tokenizer, *, task: str, max_seq_len: int, seed: int,
                  labels: list[str] | None = None, num_labels: int | None = None, packing: bool = False,
                  expect: dict | None = None, method: str = "sft") -> LoadedData:
    """Read, check and tokenize a job's data where it trains (the Ray Train worker, the pack worker).

    Reads the same sources the driver checked (a local path, or s3:// with the farm's storage
    options from this process's environment, which the farm forwards to Ray processes) with the job's
    own tokenizer, and returns the tokenized rows as plain columns (input_ids, attention_mask, labels;
    the train side packed when `packing`). `expect` is the driver's `DataSummary.stats`: a file whose
    bytes changed since the driver checked it is refused (DataError) rather than trained on unchecked.
    """
    fmt, sides = _plan(spec, task, seed, labels, num_labels, packing, method)
    if expect:
        for side in sides:
            was = (expect.get(side.name) or {}).get("sha256")
            if was and was != side.scanned.sha256:
                raise DataError(
                    f"{side.source}: the file changed since the job's data was checked (sha256 {was[:12]}... "
                    f"then, {side.scanned.sha256[:12]}... now); run the job again to check the new data"
                )
    stats, cols = {}, {}
    for side in sides:
        packed = packing and side.name == "train"
        counts = _run_side(side, fmt, spec, tokenizer, max_seq_len, labels, num_labels, keep=True, pack=packed)
        stats[side.name] = counts.entry(side)
        cols[side.name] = pack(counts.columns, max_seq_len) if packed else counts.columns
    return LoadedData(cols["train"], cols["eval"], stats, _label_names(task, labels, num_labels))


def load_worker_data(cfg: dict) -> LoadedData:
    """`load_prepared` from the plain arguments `farm.train.builders.data_config` builds: loads the
    job's tokenizer here, in the worker."""
    from farm.modeling import load_tokenizer

    tok = cfg["tokenizer"]
    tokenizer = load_tokenizer(tok["source"], tok.get("revision"))
    return load_prepared(cfg["spec"], tokenizer, **cfg["options"], expect=cfg.get("expect"))


def prepare_data(spec: DatasetSpec, *, task: str, tokenizer, max_seq_len: int, seed: int,
                 labels: list[str] | None = None, num_labels: int | None = None, packing: bool = False,
                 method: str = "sft") -> PreparedData:
    """Read, check and tokenize train and eval data for a task (causal_lm or seq_cls), whole in memory.

    Raises DataError naming the file, row, column and what is expected for any bad input.
    """
    import datasets

    d = load_prepared(spec, tokenizer, task=task, max_seq_len=max_seq_len, seed=seed, labels=labels,
                      num_labels=num_labels, packing=packing, method=method)
    return PreparedData(train=datasets.Dataset.from_dict(d.train), eval=datasets.Dataset.from_dict(d.eval),
                        stats=d.stats, label_names=d.label_names)


# ---------------------------------------------------------------------------------------------
# Tokenizing helpers


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
