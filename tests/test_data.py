"""The data pipeline on the tiny models' tokenizer: every format's loss mask exactly, the seeded eval
split, jsonl/json/parquet/csv inputs, packing, and bad data failing with a message that names the
file, the row, the column and what is allowed. Every bad-data case runs twice: through the worker's
path (prepare_data, rows kept) and the driver's streaming check (check_data), which must agree."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from farm.errors import DataError
from farm.manifest import DatasetSpec, load_manifest
from farm.train.data import IGNORE_INDEX, Collator, check_data, load_prepared, prepare_data

REPO = Path(__file__).resolve().parents[1]

PC_ROWS = [
    {"prompt": "Customer: How do I reset my red sensor?\nAgent:", "completion": " Hold the button for ten seconds."},
    {"prompt": "Customer: How do I pair my thermostat?\nAgent:", "completion": " Open the farm app and tap add."},
    {"prompt": "Customer: Where is my order?\nAgent:", "completion": " It ships tomorrow."},
    {"prompt": "Customer: Can I return a camera?\nAgent:", "completion": " Yes, within thirty days."},
]
CHAT_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "You are the farm's support agent."},
            {"role": "user", "content": "How do I reset my sensor?"},
            {"role": "assistant", "content": "Hold the button for ten seconds."},
            {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "The light blinks red."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Is the camera waterproof?"},
            {"role": "assistant", "content": "Yes, it is."},
        ]
    },
]
CLS_ROWS = [
    {"text": "The camera is excellent.", "label": "positive"},
    {"text": "The speaker is terrible.", "label": "negative"},
    {"text": "The doorbell is okay.", "label": "neutral"},
    {"text": "The router is great.", "label": "positive"},
]
LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prep(tok, train, *, max_seq_len=128, seed=0, check=False, **spec):
    return (check_data if check else prepare_data)(
        DatasetSpec(train=str(train), **spec), task="causal_lm", tokenizer=tok, max_seq_len=max_seq_len, seed=seed
    )


def prep_cls(tok, train, *, labels=None, num_labels=None, max_seq_len=64, check=False, **spec):
    return (check_data if check else prepare_data)(
        DatasetSpec(train=str(train), **spec),
        task="seq_cls",
        tokenizer=tok,
        max_seq_len=max_seq_len,
        seed=0,
        labels=labels,
        num_labels=num_labels,
    )


def data_error(fn, *args, **kwargs) -> str:
    """The DataError text of the worker's path; the driver's streaming check must raise the same."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    with pytest.raises(DataError) as streamed:
        fn(*args, check=True, **kwargs)
    assert str(streamed.value) == str(info.value)
    return str(info.value)


# ---- formats: the loss mask, token by token


def test_prompt_completion_masks_prompt_and_adds_eos(tok, tmp_path):
    f = jsonl(tmp_path / "pc.jsonl", PC_ROWS)
    d = prep(tok, f, eval=str(f), format="prompt_completion")
    assert d.train.column_names == ["input_ids", "attention_mask", "labels"]
    for row, src in zip(d.train, PC_ROWS):
        p = tok(src["prompt"])["input_ids"]
        c = tok(src["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert row["input_ids"] == p + c
        assert row["labels"] == [IGNORE_INDEX] * len(p) + c
        assert row["attention_mask"] == [1] * len(p + c)
        assert tok.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == src["completion"] + tok.eos_token


def test_chat_loss_on_assistant_turns_only(tok, tmp_path):
    f = jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    d = prep(tok, f, eval=str(f))  # auto -> chat
    assert d.stats["train"]["format"] == "chat"
    for row, src in zip(d.train, CHAT_ROWS):
        full = tok.apply_chat_template(src["messages"], tokenize=False)
        assert tok.decode(row["input_ids"]) == full
        # Contiguous runs of trainable tokens are exactly the assistant contents, each with its eos.
        runs, cur = [], []
        for t in row["labels"]:
            if t == IGNORE_INDEX:
                if cur:
                    runs.append(cur)
                cur = []
            else:
                cur.append(t)
        if cur:
            runs.append(cur)
        expected = [m["content"] + tok.eos_token for m in src["messages"] if m["role"] == "assistant"]
        assert [tok.decode(r) for r in runs] == expected
        assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(row["labels"], row["input_ids"]))


def test_text_trains_on_every_token(tok, tmp_path):
    f = jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox."}, {"text": "Jumps over the lazy dog."}])
    d = prep(tok, f, eval=str(f))
    row = d.train[0]
    assert row["labels"] == row["input_ids"] == tok("The quick brown fox.")["input_ids"] + [tok.eos_token_id]
    assert d.stats["train"]["format"] == "text"
    assert d.stats["train"]["tokens"] == d.stats["train"]["trainable_tokens"] == sum(len(r) for r in d.train["input_ids"])


def test_classification_string_and_int_labels(tok, tmp_path):
    f = jsonl(tmp_path / "cls.jsonl", CLS_ROWS)
    d = prep_cls(tok, f, labels=LABELS, eval=str(f))
    assert d.train["labels"] == [2, 0, 1, 2]
    assert d.label_names == LABELS
    assert d.train[0]["input_ids"] == tok("The camera is excellent.")["input_ids"]

    g = jsonl(tmp_path / "ints.jsonl", [{"text": r["text"], "label": LABELS.index(r["label"])} for r in CLS_ROWS])
    d2 = prep_cls(tok, g, num_labels=3, eval=str(g))
    assert d2.train["labels"] == [2, 0, 1, 2] and d2.label_names == ["0", "1", "2"]


def test_auto_picks_format_from_columns(tok, tmp_path):
    f = jsonl(tmp_path / "pc.jsonl", PC_ROWS)
    assert prep(tok, f, eval=str(f)).stats["train"]["format"] == "prompt_completion"
    g = jsonl(tmp_path / "cls.jsonl", CLS_ROWS)
    assert prep_cls(tok, g, labels=LABELS, eval=str(g)).stats["train"]["format"] == "classification"
    # text+label with a causal task trains on the text
    assert prep(tok, g, eval=str(g)).stats["train"]["format"] == "text"


def test_custom_column_names(tok, tmp_path):
    rows = [{"q": r["prompt"], "a": r["completion"]} for r in PC_ROWS]
    f = jsonl(tmp_path / "qa.jsonl", rows)
    d = prep(tok, f, eval=str(f), prompt_column="q", completion_column="a")
    assert d.stats["train"]["format"] == "prompt_completion" and d.stats["train"]["rows"] == 4


# ---- lineage, splits, file types


def test_stats_hash_file_bytes(tok, tmp_path):
    f = jsonl(tmp_path / "pc.jsonl", PC_ROWS)
    d = prep(tok, f, eval=str(f))
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    assert d.stats["train"]["source"] == str(f)
    assert d.stats["train"]["sha256"] == d.stats["eval"]["sha256"] == digest
    assert d.stats["train"]["rows"] == 4 and d.stats["train"]["dropped"] == 0
    assert d.stats["train"]["tokens"] == sum(len(x) for x in d.train["input_ids"])


def test_eval_split_is_seeded_and_disjoint(tok, tmp_path):
    rows = [{"text": f"row number {i}"} for i in range(20)]
    f = jsonl(tmp_path / "t.jsonl", rows)

    def split(seed):
        d = prep(tok, f, seed=seed, eval_fraction=0.25)
        return [tok.decode(x[:-1]) for x in d.train["input_ids"]], [tok.decode(x[:-1]) for x in d.eval["input_ids"]], d

    train0, eval0, d = split(0)
    assert (train0, eval0) == split(0)[:2]
    assert len(eval0) == 5 and len(train0) == 15
    assert sorted(train0 + eval0) == sorted(r["text"] for r in rows)
    assert split(1)[1] != eval0
    assert d.stats["eval"]["source"] == f"{f}#eval_fraction=0.25,seed=0"
    assert d.stats["eval"]["rows"] == 5


def test_tiny_split_keeps_one_row_each_side(tok, tmp_path):
    f = jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two"}])
    d = prep(tok, f, eval_fraction=0.01)
    assert (len(d.train), len(d.eval)) == (1, 1)


def test_parquet_csv_and_json_array_match_jsonl(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(PC_ROWS)
    pq.write_table(table, tmp_path / "pc.parquet")
    pcsv.write_csv(table, tmp_path / "pc.csv")
    (tmp_path / "pc.json").write_text(json.dumps(PC_ROWS, indent=2))
    ref = prep(tok, jsonl(tmp_path / "pc.jsonl", PC_ROWS), eval=str(tmp_path / "pc.jsonl"))
    for name in ("pc.parquet", "pc.csv", "pc.json"):
        f = tmp_path / name
        d = prep(tok, f, eval=str(f))
        assert d.train["input_ids"] == ref.train["input_ids"], name
        assert d.train["labels"] == ref.train["labels"], name
        assert d.stats["train"]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()


def test_chat_from_parquet_and_int_labels_from_csv(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(CHAT_ROWS), tmp_path / "chat.parquet")
    f = tmp_path / "chat.parquet"
    ref = prep(tok, jsonl(tmp_path / "chat.jsonl", CHAT_ROWS), eval=str(tmp_path / "chat.jsonl"))
    assert prep(tok, f, eval=str(f)).train["labels"] == ref.train["labels"]

    csv = tmp_path / "cls.csv"
    csv.write_text("text,label\n" + "".join(f'"{r["text"]}",{LABELS.index(r["label"])}\n' for r in CLS_ROWS))
    assert prep_cls(tok, csv, num_labels=3, eval=str(csv)).train["labels"] == [2, 0, 1, 2]


# ---- truncation and packing


def test_truncation_drops_rows_without_trainable_tokens(tok, tmp_path):
    rows = PC_ROWS + [{"prompt": "word " * 200, "completion": " lost"}]
    f = jsonl(tmp_path / "pc.jsonl", rows)
    d = prep(tok, f, eval=str(f), max_seq_len=32)
    assert d.stats["train"]["dropped"] == 1 and d.stats["train"]["rows"] == 4
    assert all(len(x) <= 32 for x in d.train["input_ids"])


def test_packing_fills_blocks_and_keeps_masks(tok, tmp_path):
    rows = PC_ROWS * 5
    f = jsonl(tmp_path / "pc.jsonl", rows)
    plain = prepare_data(DatasetSpec(train=str(f), eval=str(f)), task="causal_lm", tokenizer=tok, max_seq_len=64, seed=0)
    packed = prepare_data(
        DatasetSpec(train=str(f), eval=str(f)), task="causal_lm", tokenizer=tok, max_seq_len=64, seed=0, packing=True
    )
    assert len(packed.train) < len(plain.train)
    assert packed.stats["train"]["sequences"] == len(packed.train)
    assert all(len(x) <= 64 for x in packed.train["input_ids"])
    flat = lambda col: [t for x in col for t in x]  # noqa: E731
    assert flat(packed.train["input_ids"]) == flat(plain.train["input_ids"])
    assert flat(packed.train["labels"]) == flat(plain.train["labels"])
    assert len(packed.eval) == len(plain.eval)  # eval stays one example per row


def test_collator_right_pads(tok):
    feats = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    b = Collator(tok.pad_token_id)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, tok.pad_token_id, tok.pad_token_id]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    cls = Collator(None, pad_to_multiple_of=4)([{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": 2}])
    assert cls["input_ids"].tolist() == [[1, 2, 0, 0]] and cls["labels"].tolist() == [2]


# ---- bad data: file, row, column and what is expected


def test_missing_file(tok, tmp_path):
    msg = data_error(prep, tok, tmp_path / "nope.jsonl")
    assert msg == f"{tmp_path / 'nope.jsonl'}: file not found"


def test_bad_json_line_number(tok, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(PC_ROWS[0]) + "\n\n" + '{"prompt": "x", "completion": \n')
    assert data_error(prep, tok, f).startswith(f"{f}: line 3: not JSON (Expecting value at column 31)")


def test_empty_file(tok, tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n  \n")
    assert data_error(prep, tok, f) == f"{f}: the file is empty"


def test_corrupt_parquet(tok, tmp_path):
    f = tmp_path / "bad.parquet"
    f.write_bytes(b"PAR1 this is not parquet")
    assert data_error(prep, tok, f).startswith(f"{f}: cannot read as parquet (")


def test_missing_column_lists_columns_found(tok, tmp_path):
    f = jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "answer": "b"}] * 3)
    msg = data_error(prep, tok, f, format="prompt_completion")
    assert msg == f"{f}: missing column 'completion' needed by format prompt_completion (columns found: prompt, answer)"


def test_auto_names_expected_columns(tok, tmp_path):
    f = jsonl(tmp_path / "x.jsonl", [{"question": "a", "answer": "b"}] * 3)
    msg = data_error(prep, tok, f)
    assert msg == (
        "cannot tell the format from the columns: expected 'messages' (chat), 'prompt' + 'completion' "
        "(prompt_completion), 'text' (text) or 'prompt' + 'chosen' + 'rejected' (preference) "
        "(columns found: question, answer)"
    )


def test_wrong_types_each_row_named(tok, tmp_path):
    rows = [
        CHAT_ROWS[1],
        {"messages": "hello"},
        {"messages": [{"role": "bot", "content": "hi"}]},
        {"messages": [{"role": "user", "content": 3}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ]
    f = jsonl(tmp_path / "chat.jsonl", rows)
    msg = data_error(prep, tok, f, eval=str(f))
    assert msg.splitlines() == [
        f"{f}: 4 bad rows",
        "  - line 2: column 'messages': must be a non-empty list of {role, content} messages (got string)",
        "  - line 3: column 'messages': message 1: role must be one of system, user, assistant (got 'bot')",
        "  - line 4: column 'messages': message 1 (user): content must be a string (got number)",
        "  - line 5: column 'messages': has no assistant message; the loss is computed on assistant turns only",
    ]


def test_label_outside_label_set(tok, tmp_path):
    f = jsonl(tmp_path / "cls.jsonl", CLS_ROWS + [{"text": "meh", "label": "mixed"}])
    msg = data_error(prep_cls, tok, f, labels=LABELS, eval=str(f))
    assert msg.splitlines()[1] == (
        "  - line 5: column 'label': label 'mixed' is not in the label set (allowed: negative, neutral, positive)"
    )


def test_int_label_out_of_range(tok, tmp_path):
    f = jsonl(tmp_path / "cls.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 3}, {"text": "c", "label": True}])
    lines = data_error(prep_cls, tok, f, num_labels=3, eval=str(f)).splitlines()
    assert lines[1] == "  - line 2: column 'label': label id 3 is out of range (allowed: 0..2)"
    assert lines[2] == "  - line 3: column 'label': must be a class name (string) or an int id (got bool)"


def test_string_labels_need_label_names(tok, tmp_path):
    f = jsonl(tmp_path / "cls.jsonl", CLS_ROWS)
    msg = data_error(prep_cls, tok, f, num_labels=3, eval=str(f))
    assert "line 1: column 'label': string label 'positive' needs the manifest's `labels: [...]`" in msg
    assert "string labels found: negative, neutral, positive" in msg
    assert data_error(prep_cls, tok, f, eval=str(f)) == (
        "task seq_cls needs labels (class names) or num_labels from the manifest"
    )


def test_no_tokens_left_after_truncation(tok, tmp_path):
    f = jsonl(tmp_path / "pc.jsonl", [{"prompt": "word " * 100, "completion": " x"}] * 2)
    assert data_error(prep, tok, f, eval=str(f), max_seq_len=16) == (
        f"{f}: no trainable tokens left after truncation: every prompt fills max_seq_len=16 tokens, "
        "so no completion token is left"
    )


def test_eval_split_leaving_no_rows(tok, tmp_path):
    f = jsonl(tmp_path / "one.jsonl", [{"text": "only row"}])
    assert data_error(prep, tok, f) == (
        f"{f}: eval_fraction=0.1 of 1 row leaves 0 rows for training; give more rows or a separate eval file"
    )


def test_many_bad_rows_are_counted(tok, tmp_path):
    f = jsonl(tmp_path / "t.jsonl", [{"text": i} for i in range(25)])
    lines = data_error(prep, tok, f, eval=str(f)).splitlines()
    assert lines[0] == f"{f}: 25 bad rows"
    assert lines[1] == "  - line 1: column 'text': must be a string (got int)"
    assert lines[-1] == "  ... and 15 more"


# ---- the shipped jobs' data


@pytest.mark.parametrize("job", ["customer_x.yaml", "customer_y.yaml"])
def test_shipped_job_data_prepares(tok, job):
    m = load_manifest(REPO / "jobs" / job)
    d = prepare_data(
        m.dataset,
        task=m.task,
        tokenizer=tok,
        max_seq_len=m.training.max_seq_len,
        seed=m.training.seed,
        labels=m.labels,
        num_labels=m.num_labels,
        packing=m.training.packing,
    )
    assert len(d.train) > len(d.eval) > 0
    assert d.stats["train"]["dropped"] == 0


# ---- S3


@pytest.mark.s3
def test_s3_input_matches_local(tok, tmp_path, s3_env):
    import fsspec

    from farm.train.data import storage_options

    local = jsonl(tmp_path / "pc.jsonl", PC_ROWS)
    url = f"{s3_env}/data/pc.jsonl"
    fs, _ = fsspec.core.url_to_fs(url, **storage_options(url))  # endpoint from AWS_ENDPOINT_URL
    fs.pipe(url, local.read_bytes())
    d = prep(tok, url, eval=url)
    ref = prep(tok, local, eval=str(local))
    assert d.train["labels"] == ref.train["labels"]
    assert d.stats["train"]["source"] == url
    assert d.stats["train"]["sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()
    missing = f"{s3_env}/data/none.jsonl"
    assert data_error(prep, tok, missing) == f"{missing}: file not found"


def test_chat_from_csv_json_cells_and_template_errors(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pcsv

    f = tmp_path / "chat.csv"
    pcsv.write_csv(pa.Table.from_pylist([{"messages": json.dumps(r["messages"])} for r in CHAT_ROWS]), f)
    ref = prep(tok, jsonl(tmp_path / "chat.jsonl", CHAT_ROWS), eval=str(tmp_path / "chat.jsonl"))
    assert prep(tok, f, eval=str(f)).train["labels"] == ref.train["labels"]

    strict = tok.__class__.from_pretrained(tok.name_or_path)
    strict.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{% generation %}x{% endgeneration %}"
    g = jsonl(tmp_path / "sys.jsonl", CHAT_ROWS)
    msg = data_error(prep, strict, g, eval=str(g))
    assert msg.startswith(f"{g}: line 1: column 'messages': the tokenizer's chat template rejected these messages (")
    assert "no system role" in msg

    strict.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert "has no {% generation %} markers" in data_error(prep, strict, g, eval=str(g))


# ---- the driver's streaming check and the worker's load


def _summary_matches(tok, spec: DatasetSpec, **kw) -> None:
    kw = {"task": "causal_lm", "max_seq_len": 64, "seed": 3, **kw}
    head = check_data(spec, tokenizer=tok, **kw)
    worker = prepare_data(spec, tokenizer=tok, **kw)
    assert head.stats == worker.stats
    assert head.train_rows == len(worker.train)
    assert head.label_names == worker.label_names


def test_streaming_check_counts_what_the_worker_loads(tok, tmp_path):
    pc = jsonl(tmp_path / "pc.jsonl", PC_ROWS * 6 + [{"prompt": "word " * 200, "completion": " lost"}])
    _summary_matches(tok, DatasetSpec(train=str(pc), eval_fraction=0.3))
    _summary_matches(tok, DatasetSpec(train=str(pc), eval_fraction=0.3), packing=True)
    chat = jsonl(tmp_path / "chat.jsonl", CHAT_ROWS * 3)
    _summary_matches(tok, DatasetSpec(train=str(chat), eval=str(chat)), max_seq_len=40)
    cls = jsonl(tmp_path / "cls.jsonl", CLS_ROWS * 3)
    _summary_matches(tok, DatasetSpec(train=str(cls), eval_fraction=0.25), task="seq_cls", labels=LABELS)


def test_split_is_the_seeded_shuffle_of_row_indices(tok, tmp_path):
    """The split the farm has always made: random.Random(seed).shuffle(range(n)), the first
    round(n * fraction) indices to eval, file order kept on both sides."""
    import random

    rows = [{"text": f"row number {i}"} for i in range(37)]
    f = jsonl(tmp_path / "t.jsonl", rows)
    d = load_prepared(DatasetSpec(train=str(f), eval_fraction=0.2), tok, task="causal_lm", max_seq_len=64, seed=7)
    order = list(range(37))
    random.Random(7).shuffle(order)
    want_eval = sorted(order[:7])
    want_train = sorted(order[7:])
    assert [tok.decode(x[:-1]) for x in d.eval["input_ids"]] == [rows[i]["text"] for i in want_eval]
    assert [tok.decode(x[:-1]) for x in d.train["input_ids"]] == [rows[i]["text"] for i in want_train]


def test_worker_refuses_data_changed_since_the_check(tok, tmp_path):
    f = jsonl(tmp_path / "pc.jsonl", PC_ROWS)
    spec = DatasetSpec(train=str(f), eval=str(f))
    head = check_data(spec, task="causal_lm", tokenizer=tok, max_seq_len=64, seed=0)
    same = load_prepared(spec, tok, task="causal_lm", max_seq_len=64, seed=0, expect=head.stats)
    assert same.stats == head.stats
    jsonl(f, PC_ROWS[:3])
    with pytest.raises(DataError, match=r"pc.jsonl: the file changed since the job's data was checked"):
        load_prepared(spec, tok, task="causal_lm", max_seq_len=64, seed=0, expect=head.stats)


@pytest.mark.parametrize("arrow_threads", [1, 2])
def test_streamed_csv_gets_the_whole_file_readers_types(tmp_path, arrow_threads):
    """pyarrow's streaming CSV reader fixes column types from the first block; the scan widens them
    the way read_csv would (int -> double -> string), so a late '1.5' or 'pos' reads as before. On one
    thread (OMP_NUM_THREADS=1 sizes pyarrow's pool) its conversion error names the row as well."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    before = pa.cpu_count()
    pa.set_cpu_count(arrow_threads)
    try:
        _check_late_csv_types(tmp_path, pcsv)
    finally:
        pa.set_cpu_count(before)


def _check_late_csv_types(tmp_path, pcsv):

    from farm.train import sources

    f = tmp_path / "late.csv"
    body = "".join(f'"row {i}",{i % 3},{i}\n' for i in range(70_000))  # > pyarrow's 1 MB first block
    f.write_text("text,label,score\n" + body + '"last",pos,1.5\n')
    want = pcsv.read_csv(f)
    s = sources.scan(str(f))
    assert s.n_rows == want.num_rows and s.columns == want.schema.names
    assert s.csv_types == {fld.name: str(fld.type) for fld in want.schema}
    got = [r for _, r in sources.rows(s)]
    assert got[-1] == {"text": "last", "label": "pos", "score": 1.5} and got[:3] == want.slice(0, 3).to_pylist()
    assert s.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()


def test_json_lines_split_on_newlines_only(tok, tmp_path):
    """A JSON string may hold U+2028 unescaped; it is not a line break of the file."""
    f = tmp_path / "u.jsonl"
    f.write_text(json.dumps({"text": "one\u2028two"}, ensure_ascii=False) + "\n" + json.dumps({"text": "x"}) + "\n")
    d = prep(tok, f, eval=str(f))
    assert d.stats["train"]["rows"] == 2
