"""The job manifest: every bad input names the YAML path, the bad value and what is allowed; all
problems of a file are reported at once; `farm validate` prints them without a traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from farm.errors import ManifestError
from farm.manifest import load_manifest, parse_manifest

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted((REPO / "jobs").glob("*.yaml"))

GOOD = {
    "customer": "acme",
    "adapter": "support-bot",
    "base_model": "org/some-model",
    "dataset": {"train": "/data/train.jsonl"},
}


def with_(**over) -> dict:
    """GOOD with sections merged: with_(training={"seed": 1})."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


def problems(data) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(data, source="job.yaml")
    assert str(info.value).startswith("job.yaml: ")
    return info.value.problems


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_good_manifest_defaults():
    m = parse_manifest(GOOD)
    assert (m.quantization, m.double_quant, m.task, m.lora.target_modules) == ("nf4", True, "causal_lm", "all-linear")
    assert m.training.epochs == 1.0 and m.training.max_steps is None
    assert m.summary() == "acme/support-bot: causal_lm on org/some-model (nf4), LoRA r=8 on all-linear, 1 epoch"


@pytest.mark.parametrize(
    "data, expected",
    [
        pytest.param(
            with_(training={"learnin_rate": 1e-4}),
            "training.learnin_rate: unknown key 'learnin_rate'; did you mean 'learning_rate'? (allowed: batch_size,",
            id="unknown-key-did-you-mean",
        ),
        pytest.param(
            with_(lerning_rate=1e-4),
            "lerning_rate: unknown key 'lerning_rate'; did you mean 'training.learning_rate' (in another section)?",
            id="unknown-key-other-section",
        ),
        pytest.param(
            with_(lora={"rank": 8}),
            "lora.rank: unknown key 'rank' (allowed: alpha, bias, dropout, modules_to_save, r, target_modules)",
            id="unknown-key-no-suggestion",
        ),
        pytest.param(with_(customer="Acme"), "customer: must be 1-63 characters", id="name-uppercase"),
        pytest.param(with_(adapter="a..b"), "no '..' (got 'a..b')", id="name-dotdot"),
        pytest.param(with_(adapter="../etc"), "(got '../etc')", id="name-path-escape"),
        pytest.param(with_(adapter="team/bot"), "adapter: must be 1-63 characters", id="name-slash"),
        pytest.param(with_(adapter="a" * 64), "adapter: must be 1-63 characters", id="name-too-long"),
        pytest.param(with_(customer=""), "customer: must be 1-63 characters", id="name-empty"),
        pytest.param(
            with_(quantization="nf8"),
            "quantization: must be one of 'nf4', 'fp4', 'int8', 'none' (got 'nf8')",
            id="enum-quantization",
        ),
        pytest.param(
            with_(training={"lr_scheduler": "cosinus"}),
            "training.lr_scheduler: must be one of 'linear', 'cosine', 'constant', 'constant_with_warmup' (got 'cosinus')",
            id="enum-nested",
        ),
        pytest.param(
            with_(dataset={"format": "sharegpt"}),
            "dataset.format: must be one of 'auto', 'text', 'prompt_completion', 'chat', 'classification', 'preference' (got 'sharegpt')",
            id="enum-format",
        ),
        pytest.param(with_(lora={"r": 0}), "lora.r: must be greater than or equal to 1 (got 0)", id="range-r"),
        pytest.param(
            with_(training={"learning_rate": 2}),
            "training.learning_rate: must be less than or equal to 1 (got 2)",
            id="range-lr",
        ),
        pytest.param(with_(lora={"dropout": 1.5}), "lora.dropout: must be less than 1 (got 1.5)", id="range-dropout"),
        pytest.param(
            with_(dataset={"eval_fraction": 0}),
            "dataset.eval_fraction: must be greater than 0 (got 0)",
            id="range-eval-fraction",
        ),
        pytest.param(
            with_(training={"batch_size": "four"}),
            "training.batch_size: must be a valid integer, unable to parse string as an integer (got 'four')",
            id="wrong-type",
        ),
        pytest.param(with_(task="seq_cls"), "num_labels: task seq_cls needs num_labels or labels", id="seq-cls-no-labels"),
        pytest.param(
            with_(task="seq_cls", labels=["a", "b"], num_labels=3),
            "num_labels: 3 does not match the 2 labels given",
            id="seq-cls-label-count",
        ),
        pytest.param(
            with_(task="seq_cls", labels=["pos", "pos"]),
            "labels: must be at least 2 distinct class names",
            id="seq-cls-duplicate-labels",
        ),
        pytest.param(
            with_(dataset={"format": "classification"}),
            "dataset.format: classification needs task seq_cls",
            id="classification-with-causal-lm",
        ),
        pytest.param(with_(labels=["a", "b"]), "labels/num_labels: only allowed with task seq_cls", id="labels-causal"),
        pytest.param(
            with_(lora={"target_modules": "all"}),
            "lora.target_modules: must be a list of module names (e.g. [q_proj, v_proj]) or 'all-linear' (got 'all')",
            id="target-modules-string",
        ),
        pytest.param(
            with_(lora={"target_modules": []}),
            "lora.target_modules: must name at least one module, or be 'all-linear' (got [])",
            id="target-modules-empty",
        ),
        pytest.param(
            with_(dataset={"train": "data/train.txt"}),
            "dataset.train: must end in .jsonl, .json, .parquet or .csv (got 'data/train.txt')",
            id="dataset-extension",
        ),
        pytest.param(
            with_(dataset="train.jsonl"),
            "dataset: must be a mapping of keys (a YAML section) (got 'train.jsonl')",
            id="section-not-mapping",
        ),
        pytest.param(with_(base_model=" "), "base_model: must be a model directory, an s3:// URL or a hub id", id="base-empty"),
        pytest.param(
            with_(lora={"bias": "lora_only"}),
            "lora.bias: 'lora_only' trains biases of the base model, which every tenant shares; the server refuses",
            id="lora-bias-refused-like-the-server",
        ),
    ],
)
def test_bad_manifest_message(data, expected):
    found = problems(data)
    assert len(found) == 1, found
    assert expected in found[0], found[0]


def test_missing_required_fields_all_listed():
    assert problems({"customer": "acme"}) == [
        "adapter: required field is missing",
        "base_model: required field is missing",
        "dataset: required field is missing",
    ]
    assert problems({**GOOD, "dataset": {}}) == ["dataset.train: required field is missing"]
    assert problems(with_(dataset={"train": None})) == ["dataset.train: must be a valid string (got None)"]


def test_several_errors_reported_at_once():
    found = problems(
        with_(customer="ACME", quantization="q4", lora={"r": -1, "alpah": 8}, training={"batch_size": 0})
    )
    assert [p.split(":")[0] for p in found] == ["customer", "quantization", "lora.r", "lora.alpah", "training.batch_size"]
    assert "did you mean 'alpha'?" in found[3]


def test_cross_field_errors_one_line_each():
    found = problems(
        with_(task="seq_cls", training={"packing": True}, dataset={"format": "chat"})
    )
    assert found == [
        "num_labels: task seq_cls needs num_labels or labels",
        "training.packing: only allowed with task causal_lm",
        "dataset.format: 'chat' cannot train task seq_cls; use classification",
    ]


def test_non_mapping_top_level():
    assert problems(["a", "b"]) == ["the manifest must be a YAML mapping of keys, got list"]


# ---- files


def test_invalid_yaml_names_line_and_column(tmp_path):
    p = write(tmp_path, "customer: acme\nadapter: [a, b\nbase_model: x\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(p)
    (problem,) = info.value.problems
    assert problem.startswith("line 3, column 11: invalid YAML:"), problem
    assert str(info.value).startswith(f"{p}: 1 problem")


def test_empty_file(tmp_path):
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, "# only a comment\n"))
    assert info.value.problems == ["the file is empty"]


def test_missing_file(tmp_path):
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "nope.yaml")
    assert info.value.problems == ["file not found"]


def test_relative_paths_resolved_against_manifest_folder(tmp_path):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    p = write(
        jobs,
        """\
        customer: acme
        adapter: bot
        base_model: ../models/tiny
        dataset:
          train: data/train.jsonl
          eval: s3://bucket/eval.jsonl
        """,
    )
    m = load_manifest(p)
    assert m.base_model == str(tmp_path / "models" / "tiny")
    assert m.dataset.train == str(jobs / "data" / "train.jsonl")
    assert m.dataset.eval == "s3://bucket/eval.jsonl"  # URLs untouched


def test_hub_id_left_as_is(tmp_path):
    p = write(tmp_path, "customer: acme\nadapter: bot\nbase_model: meta-llama/Llama-2-7b-hf\ndataset: {train: t.jsonl}\n")
    assert load_manifest(p).base_model == "meta-llama/Llama-2-7b-hf"


def test_local_dir_beside_manifest_wins_over_hub_id(tmp_path):
    (tmp_path / "org" / "model").mkdir(parents=True)
    p = write(tmp_path, "customer: acme\nadapter: bot\nbase_model: org/model\ndataset: {train: t.jsonl}\n")
    assert load_manifest(p).base_model == str(tmp_path / "org" / "model")


def test_content_hash_is_stable_and_sensitive():
    a, b = parse_manifest(GOOD), parse_manifest(dict(GOOD))
    assert a.content_hash() == b.content_hash()
    assert a.content_hash() != parse_manifest(with_(training={"seed": 1})).content_hash()


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_shipped_jobs_are_valid(path):
    m = load_manifest(path)
    raw = yaml.safe_load(path.read_text())
    assert (m.customer, m.adapter) == (raw["customer"], raw["adapter"])
    for f in (m.dataset.train, m.dataset.eval):
        assert f is None or Path(f).is_file(), f"{path.name}: {f} does not exist"


def test_shipped_jobs_exist():
    names = {p.name for p in JOBS}
    assert "customer_x.yaml" in names and len(names) >= 2


# ---- farm validate


def test_validate_cli(tmp_path):
    from farm.cli import app

    (tmp_path / "t.jsonl").write_text('{"text": "hi"}\n')  # validate checks the data exists (farm.preflight)
    good = write(tmp_path, "customer: acme\nadapter: bot\nbase_model: org/m\ndataset: {train: t.jsonl}\n", "good.yaml")
    bad = write(tmp_path, "customer: Acme\nadapter: bot\nbase_model: org/m\nqantization: nf4\n", "bad.yaml")
    runner = CliRunner()

    ok = runner.invoke(app, ["validate", str(good)])
    assert ok.exit_code == 0, ok.output
    assert ok.output.count("\n") == 1
    assert f"{good}: acme/bot: causal_lm on org/m (nf4), LoRA r=8 on all-linear, 1 epoch" in ok.output

    res = runner.invoke(app, ["validate", str(good), str(bad)])
    assert res.exit_code == 1
    assert res.exception is None or isinstance(res.exception, SystemExit)
    out = res.output
    assert "Traceback" not in out
    assert f"{bad}: 3 problems" in out
    assert "customer: must be 1-63 characters" in out
    assert "qantization: unknown key 'qantization'; did you mean 'quantization'?" in out
    assert "dataset: required field is missing" in out


def test_validate_cli_missing_file(tmp_path):
    from farm.cli import app

    res = CliRunner().invoke(app, ["validate", str(tmp_path / "none.yaml")])
    assert res.exit_code == 1
    assert "none.yaml: 1 problem" in res.output and "file not found" in res.output


def test_manifest_and_cli_import_nothing_heavy():
    code = (
        "import sys, farm.manifest, farm.cli\n"
        "heavy = [m for m in ('torch', 'ray', 'transformers', 'peft', 'datasets', 'bitsandbytes') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
