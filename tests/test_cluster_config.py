"""cluster.yaml stays a valid Ray cluster-launcher config and keeps the farm's promises:
no AWS keys, catalog and run storage on S3, dashboard on loopback only, token auth on, training
GPU nodes scale to zero."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def config(text: str) -> dict:
    return yaml.safe_load(text)


def _commands(config: dict) -> list[str]:
    """Every shell command the launcher runs, on any node."""
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    out = [c for k in keys for c in config.get(k) or []]
    for node in config["available_node_types"].values():
        for k in ("initialization_commands", "worker_setup_commands"):
            out += node.get(k) or []
    return out


def _env(config: dict) -> dict[str, str]:
    """The `export NAME=value` lines the setup commands write for every node."""
    env = {}
    for cmd in _commands(config):
        for name, value in re.findall(r"^\s*export\s+([A-Z_][A-Z0-9_]*)=(\S+)\s*$", cmd, re.M):
            env[name] = value
    return env


def _ray_starts(cmds: list[str]) -> list[str]:
    return [c for c in cmds if "ray start" in c]


def test_valid_for_ray_launcher(config):
    """Ray's own checks, as `ray up` runs them: defaults filled in, then the JSON schema + rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(copy.deepcopy(config))  # as written
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_rejects_a_broken_copy(config):
    """The validation above has teeth: a wrong type in a node type fails it."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(config)
    broken["available_node_types"]["farm-train"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_no_aws_keys_in_file(text, config):
    assert not re.search(r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}", text), "an AWS access key id is in cluster.yaml"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "aws_secret_access_key"):
        assert name not in text, f"{name} in cluster.yaml: nodes must use their IAM instance profile"
    for name, node in config["available_node_types"].items():
        assert node["node_config"].get("IamInstanceProfile"), f"node type {name} has no IAM instance profile"


def test_catalog_and_storage_on_s3(config):
    env = _env(config)
    for name in ("FARM_CATALOG", "FARM_STORAGE"):
        assert env.get(name, "").startswith("s3://"), f"{name} must be an s3:// URL, got {env.get(name)!r}"
    # Each node sources the same file before `ray start`, so every Ray process sees the settings.
    for cmd in _ray_starts(_commands(config)):
        assert ". ~/farm.env" in cmd, cmd


def test_dashboard_on_loopback_only(config):
    heads = _ray_starts(config["head_start_ray_commands"])
    assert len(heads) == 1
    host = re.search(r"--dashboard-host[= ](\S+)", heads[0])
    assert host and host.group(1) in ("127.0.0.1", "localhost"), heads[0]
    assert "0.0.0.0" not in "\n".join(_commands(config))


def test_token_auth_on_every_node(config):
    env = _env(config)
    assert env.get("RAY_AUTH_MODE") == "token"
    assert "~/.ray/auth_token" in config["file_mounts"].values(), "the token file must be copied to the nodes"
    assert all("auth_token" in remote for remote, local in config["file_mounts"].items() if "auth_token" in local)


def test_node_types(config):
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("farm_head") == 1
    train, serve = nodes["farm-train"], nodes["farm-serve"]
    assert train["min_workers"] == 0 and train["max_workers"] >= 1
    assert train["node_config"]["InstanceType"].startswith(("g5.", "g6."))
    assert serve["node_config"]["InstanceType"].startswith(("g5.", "g6."))
    assert "farm_train" in train["resources"] and "farm_serve" in serve["resources"]
    assert not set(train["resources"]) & set(serve["resources"]), "training and serving nodes share a resource"
    total_min = sum(n.get("min_workers", 0) for n in nodes.values())
    assert total_min <= config["max_workers"]
