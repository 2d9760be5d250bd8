"""Submit-time checks (farm.preflight): a manifest whose data or base model is missing fails
`farm validate` and `farm submit` at once, naming the YAML path, the value and what is wrong, with
nothing queued. The s3:// cases run against the real SeaweedFS server (tests/fixtures/s3.py)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from farm.cli import app
from farm.errors import ManifestError
from farm.preflight import check, load_checked
from farm.queue import SQLiteStore

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def model_dir(root: Path, name: str = "base", *, config: bool = True, weights: bool = True) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    if config:
        (d / "config.json").write_text('{"model_type": "llama"}')
    if weights:
        (d / "model.safetensors").write_bytes(b"\0" * 16)
    return d


def manifest(tmp_path: Path, name: str = "job.yaml", **over) -> Path:
    data = {"customer": "acme", "adapter": "bot", "base_model": "org/some-model",
            "dataset": {"train": "train.jsonl"}, **over}
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def problems_of(path: Path, offline: bool = False) -> list[str]:
    with pytest.raises(ManifestError) as exc:
        load_checked(path, offline=offline)
    return exc.value.problems


def test_good_local_references_pass(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n{"text": "there"}\n')
    (tmp_path / "eval.json").write_text('[{"text": "x"}]')
    model_dir(tmp_path / "models", "tiny")
    path = manifest(tmp_path, base_model="models/tiny", dataset={"train": "train.jsonl", "eval": "eval.json"})
    m, report = load_checked(path)
    assert report.ok and report.skipped == []
    assert m.base_model == str(tmp_path / "models" / "tiny")


def test_every_problem_at_once_with_path_value_and_reason(tmp_path):
    (tmp_path / "a_dir.jsonl").mkdir()
    path = manifest(tmp_path, base_model="./models/missing",
                    dataset={"train": "nope.jsonl", "eval": "a_dir.jsonl"})
    probs = problems_of(path)
    assert probs == [
        f"dataset.train: {tmp_path / 'nope.jsonl'}: file not found",
        f"dataset.eval: {tmp_path / 'a_dir.jsonl'}: is a directory, expected a .jsonl, .json, .parquet or .csv file",
        f"base_model: {tmp_path / 'models' / 'missing'}: no such model folder",
    ]


@pytest.mark.parametrize("content, reason", [
    (b"", "the file is empty"),
    (b"\n  \n", "the file is empty"),
    (b"not json\n", "line 1: not JSON"),
    (b"[1, 2]\n", "line 1: expected one JSON object per line, got a JSON list"),
    (b"\xff\xfe\x00garbage" * 10, "not UTF-8 text"),
])
def test_unusable_jsonl(tmp_path, content, reason):
    (tmp_path / "train.jsonl").write_bytes(content)
    (problem,) = problems_of(manifest(tmp_path))
    assert problem.startswith(f"dataset.train: {tmp_path / 'train.jsonl'}: {reason}")


def test_parquet_and_csv_sniffing(tmp_path):
    (tmp_path / "t.parquet").write_text("a,b\n1,2\n")
    (problem,) = problems_of(manifest(tmp_path, dataset={"train": "t.parquet"}))
    assert problem.endswith("not a Parquet file (no PAR1 header)")
    (tmp_path / "t.csv").write_text("text\nhello\n")
    assert load_checked(manifest(tmp_path, dataset={"train": "t.csv"}))[1].ok


@pytest.mark.parametrize("config, weights, reason", [
    (False, False, "the folder is empty"),
    (True, False, "no weights (*.safetensors) in the folder"),
    (False, True, "no config.json in the folder"),
])
def test_model_folder_without_model(tmp_path, config, weights, reason):
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
    d = model_dir(tmp_path, "m", config=config, weights=weights)
    (problem,) = problems_of(manifest(tmp_path, base_model="./m"))
    assert problem == (f"base_model: {d}: {reason}; expected a transformers model folder "
                       "(config.json and *.safetensors weights)")


def test_hub_id_is_checked_for_shape_only(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
    assert load_checked(manifest(tmp_path, base_model="meta-llama/Llama-3.1-8B"))[1].ok
    (problem,) = problems_of(manifest(tmp_path, base_model="not a/hub id/x"))
    assert problem.startswith("base_model: not a/hub id/x: not a model folder that exists, and not a hub id")
    # models/ is a folder beside the manifest: models/tiny-llama means that folder, which is missing
    (tmp_path / "models").mkdir()
    (problem,) = problems_of(manifest(tmp_path, base_model="models/tiny-llama"))
    assert problem.startswith(f"base_model: models/tiny-llama: no such model folder in {tmp_path / 'models'}")


def test_shipped_manifests_pass(tmp_path, tiny_models, real_model):
    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    (tmp_path / "models").mkdir()
    for model in (*tiny_models.values(), real_model):  # the tiny bases and the real one (customer_x_smollm2)
        (tmp_path / "models" / Path(model).name).symlink_to(model)
    for path in sorted((tmp_path / "jobs").glob("*.yaml")):
        assert load_checked(path)[1].ok


def test_validate_and_submit_fail_without_traceback_and_queue_nothing(farm_home, tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
    model_dir(tmp_path, "empty-model", config=False, weights=False)
    good = manifest(tmp_path, "good.yaml")
    bad = manifest(tmp_path, "bad.yaml", base_model="./empty-model", dataset={"train": "missing.jsonl"})
    res = runner.invoke(app, ["validate", str(good), str(bad)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"{bad}: 2 problems" in res.output
    assert f"dataset.train: {tmp_path / 'missing.jsonl'}: file not found" in res.output
    assert f"base_model: {tmp_path / 'empty-model'}: the folder is empty" in res.output
    assert f"✓ {good}" in res.output

    sub = runner.invoke(app, ["submit", str(good), str(bad)])
    assert sub.exit_code == 1 and "Traceback" not in sub.output
    assert "file not found" in sub.output and "nothing queued: 1 invalid manifest" in sub.output
    assert SQLiteStore(farm_home / "queue.db").list() == []
    assert not (farm_home / "cluster.json").exists()  # no farm was started for it


def test_check_is_callable_on_a_parsed_manifest(tmp_path):
    """The API submit path has a Manifest (no file): check() takes it directly."""
    from farm.manifest import parse_manifest

    m = parse_manifest({"customer": "a", "adapter": "b", "base_model": "org/m",
                        "dataset": {"train": str(tmp_path / "none.jsonl")}})
    assert check(m).problems == [f"dataset.train: {tmp_path / 'none.jsonl'}: file not found"]


def test_preflight_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, farm.preflight\n"
            "heavy = [m for m in ('torch', 'ray', 'transformers', 'datasets', 'botocore', 'fsspec') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---- s3:// against SeaweedFS


def put(url: str, data: bytes) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    with fs.open(url, "wb") as fh:
        fh.write(data)


@pytest.mark.s3
def test_s3_references(s3_env, tmp_path, monkeypatch):
    put(f"{s3_env}/data/train.jsonl", b'{"text": "hi"}\n')
    put(f"{s3_env}/data/empty.jsonl", b"")
    put(f"{s3_env}/models/good/config.json", b"{}")
    put(f"{s3_env}/models/good/model.safetensors", b"\0" * 16)
    put(f"{s3_env}/models/noweights/config.json", b"{}")
    good = manifest(tmp_path, "good.yaml", base_model=f"{s3_env}/models/good",
                    dataset={"train": f"{s3_env}/data/train.jsonl"})
    assert load_checked(good)[1].ok

    bucket = s3_env.split("/")[2]
    bad = manifest(tmp_path, "bad.yaml", base_model=f"{s3_env}/models/noweights",
                   dataset={"train": f"{s3_env}/data/missing.jsonl", "eval": f"s3://no-such-bucket-x/{bucket}/e.jsonl"})
    assert problems_of(bad) == [
        f"dataset.train: {s3_env}/data/missing.jsonl: S3 error: no such key (file not found)",
        f"dataset.eval: s3://no-such-bucket-x/{bucket}/e.jsonl: S3 error: no such bucket 'no-such-bucket-x'",
        f"base_model: {s3_env}/models/noweights: no weights (*.safetensors) in the folder; "
        "expected a transformers model folder (config.json and *.safetensors weights)",
    ]
    empty = manifest(tmp_path, "empty.yaml", base_model=f"{s3_env}/models/absent",
                     dataset={"train": f"{s3_env}/data/empty.jsonl"})
    assert problems_of(empty) == [
        f"dataset.train: {s3_env}/data/empty.jsonl: the file is empty",
        f"base_model: {s3_env}/models/absent: S3 error: no such key (no objects under that prefix: "
        "the model folder is missing or empty)",
    ]

    # --offline: the remote references are not checked, and validate says so
    res = runner.invoke(app, ["validate", "--offline", str(bad)])
    assert res.exit_code == 0, res.output
    assert f"not checked (--offline): dataset.train: {s3_env}/data/missing.jsonl" in res.output
    assert f"not checked (--offline): base_model: {s3_env}/models/noweights" in res.output

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    for p in problems_of(good):
        assert "S3 error: access denied" in p, p

    with socket.socket() as s:  # a port nothing listens on: bound, never listening, then closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    res = runner.invoke(app, ["validate", str(good)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.count(f"S3 error: endpoint unreachable (http://127.0.0.1:{port})") == 2, res.output


@pytest.mark.s3
def test_submit_with_absent_s3_object_queues_nothing(s3_env, farm_home, tmp_path):
    path = manifest(tmp_path, dataset={"train": f"{s3_env}/absent.jsonl"})
    res = runner.invoke(app, ["submit", str(path), "--json"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"dataset.train: {s3_env}/absent.jsonl: S3 error: no such key" in res.output
    assert SQLiteStore(farm_home / "queue.db").list() == []
