"""Where training runs on the cluster: the farm's custom resources, its training capacity, and the
resources of a job's Ray Train worker. The scheduler (how many jobs at once) and the training driver
(where this job's worker goes) both ask here; neither owns the other's placement rules.

Custom resources of the farm's node types (cluster.yaml): `farm_head` on the head that holds the
queue database, and `farm_train` on training nodes, each advertising how many jobs it runs at once
(`farm_train: 1` per GPU node).
"""

from __future__ import annotations

from dataclasses import dataclass

HEAD_RESOURCE = "farm_head"
TRAIN_RESOURCE = "farm_train"


def training_capacity() -> tuple[int, int]:
    """(slots, gpus) for training on the connected cluster. When some node advertises `farm_train`,
    only those nodes count: slots = their `farm_train` total, gpus = their GPUs (serve nodes' GPUs are
    not training capacity). Otherwise slots = 0 (no training resource) and gpus = all GPUs."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    train = [n for n in nodes if n["Resources"].get(TRAIN_RESOURCE, 0) > 0]
    if train:
        return (int(sum(n["Resources"][TRAIN_RESOURCE] for n in train)),
                int(sum(n["Resources"].get("GPU", 0) for n in train)))
    return 0, int(sum(n["Resources"].get("GPU", 0) for n in nodes))


def training_slots(cpu_slots: int) -> int:
    """Jobs at once: the `farm_train` slots of the training nodes when the cluster has them, else its
    GPUs, else `cpu_slots` (a CPU-only cluster)."""
    slots, gpus = training_capacity()
    return slots or gpus or cpu_slots


def head_resources() -> dict[str, float]:
    """A sliver of `farm_head` when the cluster has it (cluster.yaml's head, `farm up`'s local head):
    the scheduler and its driver tasks open the SQLite queue, which exists only on the head's disk. A
    0-CPU actor or task without it may be placed on any node."""
    import ray

    return {HEAD_RESOURCE: 0.001} if ray.cluster_resources().get(HEAD_RESOURCE) else {}


@dataclass(frozen=True)
class WorkerPlacement:
    """The Ray Train worker of one job: on a GPU when one can be had, else on CPU (with a note)."""

    use_gpu: bool
    gpus: int
    """GPUs the worker holds (0 on CPU)."""
    resources: dict
    """resources_per_worker for Ray Train's ScalingConfig."""
    note: str | None = None
    """Why the job runs on CPU although it asked for GPUs; None otherwise."""


def worker_placement(want_gpus: int, job_id: str) -> WorkerPlacement:
    slots, have_gpus = training_capacity()
    use_gpu = want_gpus > 0 and have_gpus > 0
    note = None
    if want_gpus > 0 and not use_gpu:
        where = "training nodes" if slots else "Ray cluster"
        note = f"resources.gpus={want_gpus} but the {where} have no GPUs: job {job_id} runs on CPU"
    resources: dict = {"CPU": 1, **({"GPU": want_gpus} if use_gpu else {})}
    if slots:
        resources[TRAIN_RESOURCE] = 1  # a training node's slot: never a serve node's GPU or the head
    return WorkerPlacement(use_gpu, want_gpus if use_gpu else 0, resources, note)
