"""farm.settings reads the environment once, for every module (unit tests, no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

from farm.settings import Settings


@pytest.mark.parametrize("value", ["1", "0", "true", "True", "TRUE", "yes", "YES", "on", "On", "off", "", "no", " 1"])
def test_hub_offline_is_read_as_huggingface_hub_reads_it(value):
    # Before, farm.modeling took only 1/true/True and farm.preflight 1/true/yes/on after strip(): with
    # HF_HUB_OFFLINE=YES the preflight said offline while the loader's error said the opposite; " 1" was
    # offline for the preflight and online for huggingface_hub.
    assert Settings.resolve({"HF_HUB_OFFLINE": value}).hub_offline is hub_constants._is_true(value)
    assert Settings.resolve({"TRANSFORMERS_OFFLINE": value}).hub_offline is hub_constants._is_true(value)


def test_every_farm_variable_has_one_reader(tmp_path):
    env = {"FARM_HOME": str(tmp_path / "h"), "FARM_CACHE": str(tmp_path / "c"), "FARM_FINETUNE": "s3://b/ft",
           "FARM_VLLM_PYTHON": "/opt/vllm/bin/python", "FARM_AUTOSCALING_CONFIG": "cluster.yaml"}
    s = Settings.resolve(env)
    assert (s.cache_dir, s.finetune_url) == (tmp_path / "c", "s3://b/ft")
    assert (s.vllm_python, s.autoscaling_config) == ("/opt/vllm/bin/python", "cluster.yaml")
    d = Settings.resolve({"FARM_HOME": str(tmp_path / "h"), "XDG_CACHE_HOME": str(tmp_path / "x")})
    assert d.finetune_url == (tmp_path / "h" / "finetune").resolve().as_uri()
    assert d.cache_dir == tmp_path / "x" / "farm"
    assert Settings.resolve({}).cache_dir == Path.home() / ".cache" / "farm"
    assert (d.vllm_python, d.autoscaling_config, d.hub_offline) == (None, None, False)


def test_train_threads_is_a_whole_number_or_every_core(monkeypatch):
    import os

    assert Settings.resolve({"FARM_TRAIN_THREADS": "3"}).cpu_train_threads() == 3
    assert Settings.resolve({}).cpu_train_threads() == len(os.sched_getaffinity(0))
    assert ("FARM_TRAIN_THREADS", "3") in Settings.resolve({"FARM_TRAIN_THREADS": "3"}).forwarded
    for bad in ("0", "two", "-1", "1.5"):
        with pytest.raises(ValueError, match=f"FARM_TRAIN_THREADS='{bad}': expected a whole number >= 1"):
            Settings.resolve({"FARM_TRAIN_THREADS": bad})


def test_no_module_reads_a_farm_variable_itself():
    """Every FARM_* / hub switch is read in farm/settings.py (cluster.py keeps the scheduler's own knobs)."""
    root = Path(__file__).resolve().parents[1] / "farm"
    names = ("FARM_HOME", "FARM_CATALOG", "FARM_STORAGE", "FARM_QUEUE_DB", "FARM_FINETUNE", "FARM_CACHE",
             "FARM_VLLM_PYTHON", "FARM_AUTOSCALING_CONFIG", "FARM_TRAIN_THREADS", "HF_HUB_OFFLINE", "XDG_CACHE_HOME")
    readers = []
    for path in root.rglob("*.py"):
        if path.name == "settings.py":
            continue
        text = path.read_text()
        for name in names:
            for call in (f'environ.get("{name}"', f'environ["{name}"]', f'getenv("{name}"'):
                if call in text:
                    readers.append(f"{path.relative_to(root)}: {name}")
    assert readers == []
