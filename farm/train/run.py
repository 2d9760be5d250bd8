"""Run one job: validate its data, fit a Ray Train TorchTrainer (one worker), publish the adapter.

This is the driver side. `run_job` is what `farm train` calls in the foreground and what the
scheduler calls inside a Ray task. The Ray Train run is named `farm-<job_id>` under the farm's run
storage, so running the same job id again resumes from its last checkpoint, and the catalog
publish uses the job id as idempotency key, so a job publishes at most once.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.errors import FarmError, TrainingError
from farm.manifest import Manifest

if TYPE_CHECKING:
    from farm.catalog import AdapterVersion, Catalog

log = logging.getLogger("farm.train")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")

ProgressFn = Callable[[dict], None]


def new_job_id() -> str:
    """A sortable, unique job id (time + randomness)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


# The farm's settings and S3 access, passed to Ray processes (the scheduler's actor and tasks, the Train
# controller and workers of `farm train` on a cluster) so they see the same farm as the caller.
FORWARDED_ENV = ("FARM_HOME", "FARM_CATALOG", "FARM_STORAGE", "FARM_QUEUE_DB", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                 "TOKENIZERS_PARALLELISM")


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster at `address`/RAY_ADDRESS, or start a local one bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # The Train controller and workers run in the cluster's processes, not this one: give them this
        # process's catalog, storage and S3 endpoint (the run storage filesystem is rebuilt there).
        env = forwarded_env()
        ray.init(address=address, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": env} if env else None)
    else:
        ray.init(
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )


# Custom resources of the farm's node types (cluster.yaml): the head that holds the queue database,
# and training nodes, each advertising how many jobs it runs at once (`farm_train: 1` per GPU node).
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


def run_storage(path: str) -> tuple[str, Any]:
    """Ray Train's (storage_path, storage_filesystem) for FARM_STORAGE. A local path (or file://) goes
    as is. A URL with another scheme goes through fsspec, so s3:// reaches S3-compatible stores at the
    standard AWS_ENDPOINT_URL, which pyarrow's own S3 client ignores."""
    if "://" not in path:
        return path, None
    if path.startswith("file://"):
        return path[len("file://"):], None
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from farm.train.data import storage_options

    options = storage_options(path)
    if path.startswith("s3://"):
        # Resume reads what another node (or attempt) wrote: never answer from a stale listing.
        options.update(use_listings_cache=False, skip_instance_cache=True)
    fs, root = fsspec.core.url_to_fs(path, **options)
    return root.rstrip("/"), PyFileSystem(FSSpecHandler(fs))


def _rows(ds) -> dict[str, list]:
    """A tokenized datasets.Dataset as plain columns (cheap to ship through the object store)."""
    return {c: ds[c] for c in ("input_ids", "attention_mask", "labels")}


class _Cost:
    """What this attempt has done, from the worker's per-step figures. The worker's `tokens` and
    `train_seconds` are cumulative for the job (restored from the checkpoint on resume); the
    `attempt_*` sums count every step this attempt ran, including steps redone after a restart, so a
    scheduler can charge each attempt without counting a resumed job twice."""

    def __init__(self, gpus: int) -> None:
        self.gpus, self.tokens, self.seconds = gpus, 0, 0.0

    def annotate(self, item: dict) -> dict:
        if "step_tokens" in item:
            self.tokens += int(item["step_tokens"])
            self.seconds += float(item.get("step_seconds") or 0.0)
        if "train_seconds" in item:
            item["accelerator_seconds"] = float(item["train_seconds"]) * self.gpus
            item.update(gpus=self.gpus, attempt_tokens=self.tokens, attempt_seconds=self.seconds)
        return item


def _drain(queue, on_progress: ProgressFn | None, stop: threading.Event, history: list, cost: _Cost) -> None:
    while not stop.is_set() or not queue.empty():
        try:
            item = queue.get(timeout=0.2)
        except Exception:  # noqa: BLE001 - queue.Empty, or the queue actor gone at shutdown
            continue
        item = cost.annotate(item)
        history.append(item)
        if on_progress is not None:
            try:
                on_progress(item)
            except Exception:  # noqa: BLE001 - a progress consumer must not kill the job
                log.exception("progress callback failed")


def run_job(
    manifest: Manifest,
    *,
    job_id: str | None = None,
    on_progress: ProgressFn | None = None,
    catalog: Catalog | None = None,
    storage_path: str | None = None,
    cpu_threads: int | None = None,
) -> AdapterVersion:
    """Train the manifest's adapter on Ray Train and publish it; returns the published version."""
    from farm.modeling import config_fingerprint, load_tokenizer
    from farm.settings import storage_path as default_storage
    from farm.train import builders
    from farm.train.data import prepare_data

    started = time.time()
    job_id = job_id or new_job_id()
    if catalog is None:
        from farm.catalog import Catalog

        catalog = Catalog()

    # Everything that can be wrong with the inputs fails here, before any Ray work starts.
    tokenizer = load_tokenizer(manifest.base_model, manifest.revision)
    data = prepare_data(
        manifest.dataset,
        task=manifest.task,
        tokenizer=tokenizer,
        max_seq_len=manifest.training.max_seq_len,
        seed=manifest.training.seed,
        labels=manifest.labels,
        num_labels=manifest.num_labels,
        packing=manifest.training.packing,
    )
    fingerprint = config_fingerprint(manifest.base_model, manifest.revision)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from farm.train.loop import FINAL_MARKER, STATE_FILE, train_loop_per_worker

    ensure_ray()
    want_gpus = manifest.resources.gpus
    train_slots, have_gpus = training_capacity()
    use_gpu = want_gpus > 0 and have_gpus > 0
    if want_gpus > 0 and not use_gpu:
        where = "training nodes" if train_slots else "Ray cluster"
        msg = f"resources.gpus={want_gpus} but the {where} have no GPUs: job {job_id} runs on CPU"
        log.warning(msg)
        if on_progress:
            on_progress({"event": "cpu_fallback", "message": msg})

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On this driver's node, like Ray Train's controller: losing the worker's node must not lose the
    # progress channel of the restarted worker.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = Queue(maxsize=10_000, actor_options={"num_cpus": 0, "scheduling_strategy": here})
    config: dict[str, Any] = {
        "model": builders.model_config(manifest, data.label_names),
        "lora": builders.lora_config(manifest),
        "optim": builders.optim_config(manifest, len(data.train)),
        "data": ray.put((_rows(data.train), _rows(data.eval))),
        "pad_token_id": tokenizer.pad_token_id,
        "progress": progress,
        "cpu_threads": cpu_threads,
    }
    resources = {"CPU": 1, **({"GPU": want_gpus} if use_gpu else {})}
    if train_slots:
        resources[TRAIN_RESOURCE] = 1  # a training node's slot: never a serve node's GPU or the head
    store_path, store_fs = run_storage(storage_path or default_storage())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"farm-{job_id}",
            storage_path=store_path,
            storage_filesystem=store_fs,
            failure_config=FailureConfig(max_failures=manifest.resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    history: list[dict] = []
    stop = threading.Event()
    cost = _Cost(want_gpus if use_gpu else 0)
    drainer = threading.Thread(target=_drain, args=(progress, on_progress, stop, history, cost), daemon=True)
    drainer.start()
    try:
        result = trainer.fit()
    except FarmError:
        raise
    except Exception as exc:  # Ray Train wraps worker errors; report the root cause in one line
        raise TrainingError(f"job {job_id} ({manifest.name}): training failed: {_root_cause(exc)}") from exc
    finally:
        stop.set()
        drainer.join(timeout=5)
        try:
            progress.shutdown()
        except Exception:  # noqa: BLE001
            pass
    if result.checkpoint is None:
        raise TrainingError(f"job {job_id} ({manifest.name}): training ended without a final checkpoint")

    import torch

    from farm.train.report import build_metadata, plot_loss_curve

    with result.checkpoint.as_directory() as ckpt_dir, tempfile.TemporaryDirectory(prefix="farm-publish-") as out:
        ckpt = Path(ckpt_dir)
        if not (ckpt / FINAL_MARKER).exists():
            raise TrainingError(f"job {job_id}: the last checkpoint is not a finished adapter")
        state = torch.load(ckpt / STATE_FILE, weights_only=False)
        final = state.get("final_metrics", {})
        for name in ADAPTER_FILES:
            if (ckpt / name).exists():
                shutil.copy2(ckpt / name, Path(out) / name)
        full_history = state.get("history", [])
        plot_loss_curve(full_history, Path(out) / "loss_curve.png", f"{manifest.name} — job {job_id}")
        metadata = build_metadata(
            job_id=job_id,
            manifest=manifest,
            base_fingerprint=fingerprint,
            data_stats=data.stats,
            label_names=data.label_names,
            final=final,
            history=full_history,
            device="cuda" if use_gpu else "cpu",
            gpus=want_gpus if use_gpu else 0,
            wall_seconds=time.time() - started,
        )
        version = catalog.publish(manifest.customer, manifest.adapter, Path(out), metadata, idempotency_key=job_id)
    log.info("job %s published %s", job_id, version.ref)
    return version


def _root_cause(exc: BaseException) -> str:
    """The innermost error message of a (possibly wrapped) Ray Train failure, on one line."""
    seen = exc
    while True:
        nxt = getattr(seen, "cause", None) or seen.__cause__
        if nxt is None or nxt is seen:
            break
        seen = nxt
    text = str(seen).strip().splitlines()
    last = next((line for line in reversed(text) if line.strip()), type(seen).__name__)
    return f"{type(seen).__name__}: {last.strip()}"
