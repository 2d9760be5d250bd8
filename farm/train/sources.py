"""Reading training data files row by row (local or s3://, through fsspec), never whole.

`scan(source)` makes one pass over a file: its sha256 (over the exact bytes), its row count and its
columns (the union over all rows, in first-seen order). `rows(scanned)` then streams `(where, row)`
pairs ("line 7" for JSON lines, "row 7" otherwise) as often as the caller needs, so a caller keeps
only the rows it wants. Every problem of reading is a DataError naming the file.

Formats: JSON lines (`.jsonl`, or `.json` holding lines) read line by line; Parquet by record batch;
CSV through pyarrow's streaming reader, with the column types that pyarrow's whole-file reader
would infer (a column whose later values do not fit the type read from the first block is widened
and the scan repeated). A `.json` file holding one JSON array is the exception: the standard library
parses it whole, so use JSON lines for big sets.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from farm.errors import DataError
from farm.rows import BOM, RowError, json_lines

KINDS = ("jsonl", "json", "parquet", "csv")
CHUNK = 1 << 20
BATCH_ROWS = 1024
# pyarrow's read_csv widens a column's type when later blocks need it; the streaming reader freezes
# the types of the first block, so the scan widens them itself, the same way.
_WIDER = {"null": "int64", "int64": "double"}
# pyarrow names the row too when it reads on one thread (OMP_NUM_THREADS=1 sizes its pool):
# "In CSV column #1: Row #70002: CSV conversion error to int64: ...".
_CSV_CONVERSION = re.compile(r"column #(\d+): (?:Row #\d+: )?CSV conversion error to ([\w\[\], ]+?):")


@dataclass
class Scanned:
    """One file as `scan` found it: what `rows` needs to stream it again."""

    source: str
    kind: str
    sha256: str
    n_rows: int
    columns: list[str]
    csv_types: dict[str, str] = field(default_factory=dict)
    """CSV only: column -> pyarrow type name, as the whole-file reader would infer them."""


def storage_options(url: str) -> dict:
    """fsspec options for a URL (farm.settings owns where the S3 endpoint comes from)."""
    from farm.settings import storage_options as options

    return options(url)


def kind(source: str) -> str:
    path = source.split("?", 1)[0].lower()
    for ext in KINDS:
        if path.endswith("." + ext):
            return ext
    raise DataError(f"{source}: unknown file type; expected .jsonl, .json, .parquet or .csv")


@contextmanager
def _open(source: str) -> Iterator[Any]:
    import fsspec

    try:
        fh = fsspec.open(source, "rb", **storage_options(source)).open()
    except FileNotFoundError:
        raise DataError(f"{source}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{source}: is a directory, expected a .jsonl, .json, .parquet or .csv file") from None
    except Exception as exc:  # noqa: BLE001 - permissions, network, credentials: all "cannot read"
        raise DataError(f"{source}: cannot read the file ({type(exc).__name__}: {exc})") from None
    try:
        yield fh
    except (DataError, GeneratorExit):
        raise
    except OSError as exc:
        raise DataError(f"{source}: cannot read the file ({type(exc).__name__}: {exc})") from None
    finally:
        fh.close()


class _Hashing:
    """A read-only file wrapper that hashes every byte read through it (pyarrow reads sequentially)."""

    def __init__(self, fh):
        self.fh, self.sha, self.blank = fh, hashlib.sha256(), True
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        if self.blank and data.strip():
            self.blank = False
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def _empty(source: str) -> DataError:
    return DataError(f"{source}: the file is empty")


# ---- JSON ----------------------------------------------------------------------------------------


def _json_lines(source: str, fh, sha=None) -> Iterator[tuple[str, dict]]:
    """A JSON Lines file's rows by farm.rows' reading rules (the upload check reads the same way)."""

    def lines():
        for raw in fh:
            if sha is not None:
                sha.update(raw)
            yield raw

    try:
        for n, obj in json_lines(lines()):
            yield f"line {n}", obj
    except RowError as exc:
        raise DataError(f"{source}: {exc}") from None


def _is_array(fh) -> bool:
    """Whether a .json file holds one JSON array (else JSON lines); leaves fh at the start."""
    head = b""
    while True:
        chunk = fh.read(4096)
        if not chunk:
            break
        head = (head + chunk).removeprefix(BOM).lstrip()
        if head:
            break
    fh.seek(0)
    return head.startswith(b"[")


def _json_array(source: str, data: bytes) -> Iterator[tuple[str, dict]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: not UTF-8 text (byte {exc.start}); is it really json?") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}: line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    del data, text
    for i, x in enumerate(items, 1):
        if not isinstance(x, dict):
            raise DataError(f"{source}: row {i}: expected a JSON object, got {type(x).__name__}")
        yield f"row {i}", x


# ---- Parquet and CSV -----------------------------------------------------------------------------


def _parquet(source: str, fh) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    n = 0
    try:
        pf = pq.ParquetFile(fh)
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                n += 1
                yield f"row {n}", row
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise DataError(f"{source}: cannot read as parquet ({type(exc).__name__}: {exc})") from None


def _parquet_meta(source: str) -> tuple[int, list[str]]:
    """Row count and columns from the footer (the rows themselves are read by `rows`)."""
    import pyarrow.parquet as pq

    with _open(source) as fh:
        try:
            pf = pq.ParquetFile(fh)
            return pf.metadata.num_rows, list(pf.schema_arrow.names)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{source}: cannot read as parquet ({type(exc).__name__}: {exc})") from None


def _csv_reader(fh, types: dict[str, str]):
    import pyarrow as pa
    import pyarrow.csv as pcsv

    convert = pcsv.ConvertOptions(column_types={c: pa.type_for_alias(t) for c, t in types.items()})
    return pcsv.open_csv(fh, convert_options=convert)


def _csv(source: str, fh, types: dict[str, str]) -> Iterator[tuple[str, dict]]:
    n = 0
    try:
        for batch in _csv_reader(fh, types):
            for row in batch.to_pylist():
                n += 1
                yield f"row {n}", row
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{source}: cannot read as csv ({type(exc).__name__}: {exc})") from None


def _scan_csv(source: str) -> tuple[str, int, list[str], dict[str, str], bool]:
    """(sha256, rows, columns, types, blank): streams the file, widening types until every block fits."""
    import pyarrow as pa

    types: dict[str, str] = {}
    for _ in range(64):
        with _open(source) as fh:
            h = _Hashing(fh)
            n, names = 0, []
            try:
                reader = _csv_reader(h, types)
                names = reader.schema.names
                found = {f.name: str(f.type) for f in reader.schema}
                for batch in reader:
                    n += batch.num_rows
            except pa.ArrowInvalid as exc:
                m = _CSV_CONVERSION.search(str(exc))
                if m is None:
                    if h.blank and _blank(source):
                        return "", 0, [], {}, True
                    raise DataError(f"{source}: cannot read as csv (ArrowInvalid: {exc})") from None
                col = names[int(m.group(1))] if names else None
                if col is None:
                    raise DataError(f"{source}: cannot read as csv (ArrowInvalid: {exc})") from None
                types = {**found, **types, col: _WIDER.get(m.group(2), "string")}
                continue
            except Exception as exc:  # noqa: BLE001
                raise DataError(f"{source}: cannot read as csv ({type(exc).__name__}: {exc})") from None
            while h.read(CHUNK):  # the reader may stop before the last bytes (a trailing blank line)
                pass
            return h.sha.hexdigest(), n, list(names), {**found, **types}, h.blank
    raise DataError(f"{source}: cannot read as csv (column types keep changing)")


# ---- entry points --------------------------------------------------------------------------------


def _hash_file(source: str) -> tuple[str, bool]:
    sha, blank = hashlib.sha256(), True
    with _open(source) as fh:
        while chunk := fh.read(CHUNK):
            sha.update(chunk)
            blank = blank and not chunk.strip()
    return sha.hexdigest(), blank


def _columns(seen: dict[str, None], row: dict) -> None:
    for k in row:
        if k not in seen:
            seen[k] = None


def scan(source: str) -> Scanned:
    """Read a data file once: sha256 of its bytes, row count, columns. Keeps no rows."""
    if not source or not source.strip():
        raise DataError("dataset path is empty")
    k = kind(source)
    seen: dict[str, None] = {}
    n, types = 0, {}
    if k == "csv":
        digest, n, cols, types, blank = _scan_csv(source)
        seen = dict.fromkeys(cols)
    elif k == "parquet":
        digest, blank = _hash_file(source)
        if not blank:
            n, cols = _parquet_meta(source)
            seen = dict.fromkeys(cols)
    else:
        sha = hashlib.sha256()
        with _open(source) as fh:
            if k == "json" and _is_array(fh):
                data = fh.read()
                sha.update(data)
                blank = not data.strip()
                if not blank:
                    for _, row in _json_array(source, data):
                        n += 1
                        _columns(seen, row)
                del data
            else:
                for _, row in _json_lines(source, fh, sha):
                    n += 1
                    _columns(seen, row)
                blank = n == 0 and _blank(source)
        digest = sha.hexdigest()
    if blank:
        raise _empty(source)
    if not n:
        raise DataError(f"{source}: the file has no rows")
    return Scanned(source, k, digest, n, list(seen), types)


def _blank(source: str) -> bool:
    return _hash_file(source)[1]


def rows(s: Scanned) -> Iterator[tuple[str, dict]]:
    """Stream (where, row) over a scanned file; row i of this stream is row i of the scan."""
    with _open(s.source) as fh:
        if s.kind == "parquet":
            yield from _parquet(s.source, fh)
        elif s.kind == "csv":
            yield from _csv(s.source, fh, s.csv_types)
        elif s.kind == "json" and _is_array(fh):
            yield from _json_array(s.source, fh.read())
        else:
            yield from _json_lines(s.source, fh)
