"""Growing the cluster for queued work. On a cluster whose autoscaler can add `farm_train` nodes,
when jobs wait and every training slot is taken, the scheduler asks the Ray autoscaler for training
nodes (`ray.autoscaler.sdk.request_resources` with one `{"farm_train": 1}` bundle per job that is
running or waiting, never more than the cluster's max) and withdraws the request (`bundles=[]`)
once nothing waits, so idle training nodes scale down after the autoscaler's idle timeout. Each job
that waits for a node gets an event saying so (`farm status`).

How far the cluster can grow is read from the autoscaler's own config: the cluster config that
autoscaler v2 / KubeRay report to the GCS, else the cluster launcher's file on the head
(FARM_AUTOSCALING_CONFIG, default ~/ray_bootstrap_config.yaml, what `ray up` writes and
`ray start --autoscaling-config` reads). Without either the cluster cannot grow and nothing changes:
slots are counted as before (farm.scheduler.training_slots).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from farm.placement import TRAIN_RESOURCE, training_capacity
from farm.queue import JobState
from farm.settings import Settings

log = logging.getLogger("farm.autoscale")

DEFAULT_CONFIG = "~/ray_bootstrap_config.yaml"


def slots_from_config(config: dict) -> int:
    """Max `farm_train` slots of an autoscaler config (cluster.yaml's shape): per node type
    max_workers x its farm_train, capped by the global max_workers."""
    per_type = []
    for node_type in (config.get("available_node_types") or {}).values():
        slots = float((node_type.get("resources") or {}).get(TRAIN_RESOURCE, 0) or 0)
        if slots > 0:
            per_type.append((int(node_type.get("max_workers", 0) or 0), int(slots)))
    total = sum(n * s for n, s in per_type)
    if "max_workers" in config and per_type:
        total = min(total, int(config["max_workers"]) * max(s for _, s in per_type))
    return total


def _slots_from_gcs() -> int | None:
    try:
        from ray._private.state import state

        cfg = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: absent or changed means "not known"
        return None
    if not cfg:
        return None
    total = 0
    for group in cfg.node_group_configs:
        slots = group.resources.get(TRAIN_RESOURCE, 0)
        if slots and group.max_count:
            total += (10**6 if group.max_count < 0 else group.max_count) * slots
    return total or None


def train_slot_limit() -> int | None:
    """The most `farm_train` slots the autoscaler can bring up; None when it cannot add any."""
    limit = _slots_from_gcs()
    if limit:
        return limit
    path = Path(Settings.resolve().autoscaling_config or DEFAULT_CONFIG).expanduser()
    if not path.is_file():
        return None
    try:
        import yaml

        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, ValueError) as exc:
        log.warning("cannot read the autoscaling config %s: %s", path, exc)
        return None
    return slots_from_config(config) or None


class TrainNodeRequests:
    """The scheduler's side of autoscaling: one instance per scheduler, called every tick."""

    def __init__(self, limit: int | None, request: Callable[..., Any] | None = None) -> None:
        self.limit = limit
        self._request = request
        self.requested = 0  # bundles asked for now (0 = no request outstanding)
        self._noted: set[str] = set()

    @classmethod
    def detect(cls) -> TrainNodeRequests:
        return cls(train_slot_limit())

    @property
    def enabled(self) -> bool:
        return bool(self.limit)

    def slots(self, fallback: Callable[[], int]) -> int:
        """Training slots: on an autoscaling cluster only live `farm_train` slots count (0 while no
        training node is up, so jobs wait for one rather than run on the head or a serve node)."""
        return training_capacity()[0] if self.enabled else fallback()

    def update(self, store: Any, running: int, slots: int) -> int:
        """Ask for (or withdraw) training nodes for what waits now; returns the bundles requested."""
        if not self.enabled:
            return 0
        waiting = [j for j in store.list(state=JobState.QUEUED) if not j.cancel_requested]
        if not waiting:
            target = 0
        elif running + len(waiting) > slots:
            target = min(running + len(waiting), int(self.limit or 0))
        else:
            target = self.requested  # free slots: the scheduler starts these jobs itself
        if target != self.requested:
            self._send(target)
        if target > slots:
            for job in waiting:
                if job.id not in self._noted:
                    self._noted.add(job.id)
                    store.note(job.id, f"waiting for a training node: asked the autoscaler for {target} "
                                       f"{TRAIN_RESOURCE} slot(s) ({slots} up, at most {self.limit})")
        self._noted &= {j.id for j in waiting}
        return self.requested

    def _send(self, bundles: int) -> None:
        request = self._request
        if request is None:
            from ray.autoscaler.sdk import request_resources as request
        request(bundles=[{TRAIN_RESOURCE: 1}] * bundles)
        log.info("autoscaler request: %d %s bundle(s)", bundles, TRAIN_RESOURCE)
        self.requested = bundles
