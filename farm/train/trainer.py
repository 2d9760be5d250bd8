"""The Ray Train trainer of a farm run, built in one place for both drivers (farm.train.run for a job
alone, farm.train.pack_run for a pack).

A farm run is one Ray Train worker that reads its own data, and the farm's own checkpoints and node-loss
resume cover what Ray Train's optional helpers would. So, per run, two helper actors are not started:
  * the DatasetManager, which Ray Train V2 starts for every run even when no Ray Dataset is passed
    (a process of its own, ~3 s of CPU on a 2-core box, for nothing);
  * the PreemptionWatcher (RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0), which tells workers of a cloud
    preemption notice. The farm's workers do not read it: a lost node is a restarted attempt that
    resumes from the member's last checkpoint (docs/operations.md).
On this 2-core box, three no-op TorchTrainer runs each way (a one-off script sampling `ps`, not a
bench/ script) used ~3.7 s less CPU per run this way; their wall time did not change.
"""

from __future__ import annotations

import os
from typing import Any

from farm.settings import TRAIN_POLL_ENV, Settings

PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def farm_trainer(train_fn, *, config: dict[str, Any], scaling_config, run_config, settings: Settings):
    """A TorchTrainer for `train_fn(config)`; sets the environment Ray Train hands its controller."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    except ImportError:  # another Ray Train layout: keep its default callbacks
        DatasetsCallback = None  # noqa: N806

    class FarmTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if DatasetsCallback is None or self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    # Ray Train hands these from this process to the controller it starts (and on to the worker).
    os.environ.setdefault(TRAIN_POLL_ENV, str(settings.train_poll_s))
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    return FarmTrainer(train_fn, train_loop_config=config, scaling_config=scaling_config, run_config=run_config)
