"""farm.train.trainer: the Ray Train trainer both drivers build (no Ray cluster needed to build one)."""

from __future__ import annotations

import os

from farm.settings import Settings


def _noop(config):
    pass


def test_a_farm_run_starts_no_dataset_manager_or_preemption_watcher(tmp_path, monkeypatch):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    from farm.train.trainer import PREEMPTION_WATCHER_ENV, farm_trainer

    for name in (PREEMPTION_WATCHER_ENV, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):
        monkeypatch.setenv(name, "")  # recorded, so what farm_trainer sets is undone after the test
        monkeypatch.delenv(name)
    trainer = farm_trainer(_noop, config={}, settings=Settings.resolve({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}),
                           scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="t", storage_path=str(tmp_path)))
    callbacks = trainer._create_default_callbacks()
    assert callbacks and not any(isinstance(c, DatasetsCallback) for c in callbacks)
    # what Ray Train hands its controller: the farm's poll interval, no preemption watcher
    assert os.environ[PREEMPTION_WATCHER_ENV] == "0"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    # the stock trainer does start one (so the filter above still finds Ray Train's callback)
    from ray.train.torch import TorchTrainer

    stock = TorchTrainer(_noop, scaling_config=ScalingConfig(num_workers=1),
                         run_config=RunConfig(name="t", storage_path=str(tmp_path)))
    assert any(isinstance(c, DatasetsCallback) for c in stock._create_default_callbacks())
