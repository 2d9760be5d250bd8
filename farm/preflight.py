"""Submit-time checks of what a manifest points at: the dataset files and the base model exist and
look usable, so a typo fails `farm validate`/`farm submit` (or an API create) in a second instead of
a queued job failing inside Ray minutes later.

The schema (farm.manifest) checks a manifest's shape; this module checks its references:
  - local dataset.train/eval: an existing, readable, non-empty file whose first bytes fit its format;
  - a local base_model: an existing folder with a config.json and weights (*.safetensors);
  - a hub id: its shape only (there may be no hub);
  - s3:// dataset files and model folders: a HEAD / a list, with S3's answer named (no such key,
    no such bucket, access denied, endpoint unreachable); `offline=True` skips these and says so.
Every problem names the YAML path, the value and what is wrong; all problems are reported at once.

Imports nothing heavy (botocore only for s3:// references, fsspec only for other URL schemes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from farm.errors import ManifestError
from farm.manifest import Manifest, is_url
from farm.rows import RowError, json_lines
from farm.settings import hub_offline, s3_endpoint

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
WEIGHT_SUFFIXES = (".safetensors",)  # what farm.modeling loads (use_safetensors=True)
_SNIFF_BYTES = 64 * 1024


@dataclass
class PreflightReport:
    """What `check` found: problems (one line each, 'yaml.path: value: what is wrong') and the
    references it did not check (remote ones when offline)."""

    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(manifest: Manifest, *, base_dir: str | Path | None = None, offline: bool = False) -> PreflightReport:
    """Check every file and model folder the manifest points at. `base_dir` is the manifest's folder
    (relative paths were resolved against it by load_manifest; it also tells a missing relative model
    folder from a hub id). Never raises for a bad reference: each becomes one problem line."""
    report = PreflightReport()
    ds = manifest.dataset
    for key, value in (("dataset.train", ds.train), ("dataset.eval", ds.eval)):
        if value is not None:
            _check_ref(report, key, value, offline, _check_local_data, _check_s3_data)
    _check_ref(report, "base_model", manifest.base_model, offline,
               lambda v: _check_local_model(v, base_dir), _check_s3_model)
    return report


def require(manifest: Manifest, *, source: str, base_dir: str | Path | None = None,
            offline: bool = False) -> PreflightReport:
    """`check`, raising ManifestError(source, problems) when anything is wrong (the schema errors'
    type and format, so callers print or return both the same way). The API submit path calls this."""
    report = check(manifest, base_dir=base_dir, offline=offline)
    if report.problems:
        raise ManifestError(source, report.problems)
    return report


def load_checked(path: str | Path, *, offline: bool = False) -> tuple[Manifest, PreflightReport]:
    """Load a manifest file and check its references: ManifestError with the schema's problems, or
    else with every reference problem. What `farm validate` and `farm submit` call per file."""
    from farm.manifest import load_manifest

    p = Path(path)
    manifest = load_manifest(p)
    return manifest, require(manifest, source=str(path), base_dir=p.resolve().parent, offline=offline)


# ---- dispatch ------------------------------------------------------------------------------------


def model_problem(value: str, *, base_dir: str | Path | None = None, offline: bool = False) -> str | None:
    """What is wrong with one base-model reference (local folder, s3:// folder, hub id), as one line
    'value: problem', or None: the checks of a manifest's base_model, for `farm serve` before it deploys."""
    report = PreflightReport()
    _check_ref(report, "base_model", value, offline, lambda v: _check_local_model(v, base_dir), _check_s3_model)
    if report.problems:
        return report.problems[0].removeprefix("base_model: ")
    if not is_url(value) and not Path(value).expanduser().is_absolute() and hub_offline() and not _hub_cached(value):
        # serving loads now: a hub id it cannot fetch would make replicas wait for the hub, then fail
        return f"{value}: not a local model folder, and not in the hub cache (HF_HUB_OFFLINE is set: it cannot be fetched)"
    return None


def _check_ref(report, key, value, offline, local, s3) -> None:
    if value.startswith("file://"):
        value = value[len("file://"):]
    if is_url(value):
        if offline:
            report.skipped.append(f"{key}: {value}")
            return
        scheme = value.split("://", 1)[0]
        problem = s3(value) if scheme == "s3" else _check_fsspec(value)
    else:
        problem = local(value)
    if problem:
        report.problems.append(f"{key}: {value}: {problem}")


# ---- local ---------------------------------------------------------------------------------------


def _check_local_data(value: str) -> str | None:
    p = Path(value)
    if not p.exists():
        return "file not found"
    if p.is_dir():
        return "is a directory, expected a .jsonl, .json, .parquet or .csv file"
    if not p.is_file():
        return "is not a regular file"
    try:
        with open(p, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError as exc:
        return f"cannot read the file ({exc.strerror or exc})"
    return _sniff(value, head)


def _sniff(value: str, head: bytes) -> str | None:
    """A cheap look at a file's first bytes: does it look like its suffix says?"""
    if not head.strip():
        return "the file is empty"
    kind = value.rsplit("?", 1)[0].lower().rsplit(".", 1)[-1]
    if kind == "parquet":
        return None if head.startswith(b"PAR1") else "not a Parquet file (no PAR1 header)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a multi-byte character cut at the sniff boundary
            return f"not UTF-8 text (bad byte at offset {exc.start})"
        text = head[: exc.start].decode("utf-8")
    if kind == "jsonl":
        # the whole lines of the head (a line cut at the sniff boundary is not judged), read as the
        # trainer reads them, up to the first object
        whole = head if len(head) < _SNIFF_BYTES else head[: head.rfind(b"\n") + 1]
        try:
            next(json_lines(whole), None)
        except RowError as exc:
            return str(exc)
    elif kind == "json" and text.lstrip()[:1] not in ("[", "{"):
        return "not JSON (expected a list of records or an object)"
    return None


def _check_local_model(value: str, base_dir: str | Path | None) -> str | None:
    p = Path(value).expanduser()
    # load_manifest made every local folder that exists beside the manifest absolute: a relative
    # value left is a hub id or a missing folder, never a folder relative to whatever cwd this runs in.
    if not p.is_absolute() or not p.exists():
        if value.startswith(("/", ".", "~")):
            return "no such model folder"
        # A hub id such as org/name. If its first part is a folder beside the manifest, the user
        # meant a local folder (e.g. models/tiny-llama) that is missing.
        if not HUB_ID_RE.fullmatch(value):
            return "not a model folder that exists, and not a hub id (expected 'org/name' or 'name')"
        first = value.split("/", 1)[0]
        if base_dir is not None and "/" in value and (Path(base_dir) / first).is_dir():
            return (f"no such model folder in {Path(base_dir) / first} (if it is a hub id, "
                    f"rename the local folder {first!r} that shadows it)")
        return None  # a hub id: shape only
    if not p.is_dir():
        return "is a file, expected a model folder (config.json and *.safetensors weights)"
    try:
        names = [f.name for f in p.iterdir()]
    except OSError as exc:
        return f"cannot read the model folder ({exc.strerror or exc})"
    return _model_files_problem(names)


def _hub_cached(repo_id: str) -> bool:
    """Whether the hub id's config.json is in the local hub cache (what an offline load reads)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached
        return False


def _model_files_problem(names: list[str]) -> str | None:
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        missing.append("weights (*.safetensors)")
    if not missing:
        return None
    what = "the folder is empty" if not names else f"no {' and no '.join(missing)} in the folder"
    return f"{what}; expected a transformers model folder (config.json and *.safetensors weights)"


# ---- s3:// ---------------------------------------------------------------------------------------


def _s3_client():
    import botocore.session
    from botocore.config import Config

    endpoint = s3_endpoint()
    session = botocore.session.get_session()
    # One quick try: a submit must not hang on an unreachable endpoint.
    config = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 1, "mode": "standard"})
    return session.create_client("s3", endpoint_url=endpoint or None, config=config)


def _split(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key.split("?", 1)[0]


def _s3_error(exc: Exception, url: str, what: str) -> str:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",):
            return f"S3 error: no such bucket {_split(url)[0]!r}"
        if code in ("404", "NoSuchKey", "NotFound"):
            return f"S3 error: no such key ({what} not found)"
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            return f"S3 error: access denied ({code}); check the credentials and the bucket policy"
        return f"S3 error: {code or status} {exc.response.get('Error', {}).get('Message', '')}".rstrip()
    if isinstance(exc, EndpointConnectionError):
        from urllib.parse import urlsplit

        u = urlsplit(str(exc.kwargs.get("endpoint_url", "")))
        return f"S3 error: endpoint unreachable ({u.scheme}://{u.netloc})"
    if isinstance(exc, NoCredentialsError):
        return "S3 error: no credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an instance profile)"
    return f"S3 error: {type(exc).__name__}: {exc}"


def _check_s3_data(url: str) -> str | None:
    bucket, key = _split(url)
    if not bucket or not key:
        return "expected s3://bucket/path/to/file"
    try:
        head = _s3_client().head_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001 - every S3 failure becomes one named problem
        if _is_missing(exc):
            return _missing_key_or_bucket(url, "file")
        return _s3_error(exc, url, "file")
    if not head.get("ContentLength"):
        return "the file is empty"
    return None


def _is_missing(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound")


def _missing_key_or_bucket(url: str, what: str) -> str:
    """HEAD answers a bare 404 for a missing bucket too: ask the bucket to name which it is."""
    bucket, _ = _split(url)
    try:
        _s3_client().head_bucket(Bucket=bucket)
    except Exception as exc:  # noqa: BLE001
        if _is_missing(exc) or "NoSuchBucket" in str(exc):
            return f"S3 error: no such bucket {bucket!r}"
    return f"S3 error: no such key ({what} not found)"


def _check_s3_model(url: str) -> str | None:
    bucket, key = _split(url)
    if not bucket:
        return "expected s3://bucket/path/to/model-folder"
    prefix = key.rstrip("/") + "/" if key else ""
    try:
        out = _s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1000)
    except Exception as exc:  # noqa: BLE001
        return _s3_error(exc, url, "model folder")
    names = [o["Key"][len(prefix):] for o in out.get("Contents", [])]
    if not names:
        return "S3 error: no such key (no objects under that prefix: the model folder is missing or empty)"
    top = [n for n in names if "/" not in n]
    return _model_files_problem(top)


# ---- other fsspec URLs (gs://, az://, memory://) -------------------------------------------------


def _check_fsspec(url: str) -> str | None:
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            return "not found"
    except Exception as exc:  # noqa: BLE001
        return f"cannot check ({type(exc).__name__}: {exc})"
    return None
