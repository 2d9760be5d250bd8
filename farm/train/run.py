"""Run one job: prepare (check its data by streaming it), fit (a Ray Train TorchTrainer, one
worker, which reads and tokenizes the data itself), publish (the adapter, its loss curve and
farm.json to the catalog).

`run_job` is what `farm train` calls in the foreground and what the scheduler calls inside a Ray
task; `prepare`, `fit` and `publish` are its three steps, usable on their own (packed training
prepares several jobs, fits them together and publishes each). The Ray Train run is named
`farm-<job id>` (farm.names.run_name) under the farm's run storage, so running the same job id again
resumes from its last checkpoint (the checkpoint names its job, so another job's storage is refused),
and the catalog publish uses the job id as idempotency key, so a job publishes at most once.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.costs import AttemptCost
from farm.errors import FarmError, TrainingError
from farm.manifest import Manifest
from farm.names import check_job_id, run_name
from farm.train.checkpoint import ADAPTER_FILES, FINAL_MARKER, check_identity, read_state

if TYPE_CHECKING:
    from farm.catalog import AdapterVersion, Catalog
    from farm.placement import WorkerPlacement
    from farm.settings import Settings
    from farm.train.data import DataSummary
    from farm.train.gate import ParityCheck

log = logging.getLogger("farm.train")

ProgressFn = Callable[[dict], None]
PARITY_ROWS = 2
"""Eval rows the parity gate compares (each costs one forward on each side)."""
PublishGate = Callable[[], None]
"""Called right before the catalog publish; raising stops the publish (a cancelled job)."""


def new_job_id() -> str:
    """A sortable, unique job id (time + randomness)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster at `address`/RAY_ADDRESS, or start a local one (farm.raycluster.connect)."""
    from farm.raycluster import connect

    connect(address)


def run_storage(path: str) -> tuple[str, Any]:
    """Ray Train's (storage_path, storage_filesystem) for FARM_STORAGE. A local path (or file://) goes
    as is. A URL with another scheme goes through fsspec, so s3:// reaches S3-compatible stores at the
    standard AWS_ENDPOINT_URL, which pyarrow's own S3 client ignores."""
    if "://" not in path:
        return path, None
    if path.startswith("file://"):
        return path[len("file://"):], None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from farm.settings import run_filesystem

    fs, root = run_filesystem(path)
    return root, PyFileSystem(FSSpecHandler(fs))


def _drain(queue, on_progress: ProgressFn | None, stop: threading.Event, history: list, cost: AttemptCost) -> None:
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


@dataclass
class Prepared:
    """A job checked and ready to fit: everything the driver knows before Ray work starts."""

    job_id: str
    manifest: Manifest
    data: DataSummary
    """Counts, stats and label names of the checked data (no rows: the worker reads them itself)."""
    pad_token_id: int
    fingerprint: str
    started: float = field(default_factory=time.time)
    baseline_ref: dict | None = None
    """The version the manifest's alias points at (farm.train.gate.baseline_ref), scored on this job's
    eval rows (alias_policy if_better)."""
    parity_rows: int = 0
    """Eval rows whose per-token logprobs the worker records for the train/serve parity check."""

    @property
    def identity(self) -> dict:
        """What the job's checkpoints are stamped with (farm.train.checkpoint.check_identity)."""
        return {"job_id": self.job_id, "customer": self.manifest.customer, "adapter": self.manifest.adapter,
                "manifest_sha256": self.manifest.content_hash()}


@dataclass
class Fitted:
    """What `fit` hands to `publish`."""

    checkpoint: Any
    """The Ray Train checkpoint of the finished run (FINAL marker inside), or a local folder of one
    (a job of a pack: farm.train.pack_run)."""
    placement: WorkerPlacement
    history: list[dict]
    lineage: dict = field(default_factory=dict)
    """Extra farm.json fields (a packed job: {"pack": <pack id>})."""

    def as_directory(self):
        import contextlib

        if isinstance(self.checkpoint, (str, Path)):
            return contextlib.nullcontext(str(self.checkpoint))
        return self.checkpoint.as_directory()


def prepare(manifest: Manifest, job_id: str) -> Prepared:
    """Load the tokenizer and check every row of the data by streaming it: every input error fails
    here, before any Ray work starts. Keeps counts, not rows (farm.train.data.check_data)."""
    from farm.modeling import config_fingerprint, load_tokenizer
    from farm.train.data import check_data

    check_job_id(job_id)
    tokenizer = load_tokenizer(manifest.base_model, manifest.revision)
    data = check_data(
        manifest.dataset,
        task=manifest.task,
        tokenizer=tokenizer,
        max_seq_len=manifest.training.max_seq_len,
        seed=manifest.training.seed,
        labels=manifest.labels,
        num_labels=manifest.num_labels,
        packing=manifest.training.packing,
        method=manifest.method,
    )
    return Prepared(job_id, manifest, data, tokenizer.pad_token_id,
                    config_fingerprint(manifest.base_model, manifest.revision))


def loop_config(job: Prepared, progress: Any, cpu_threads: int | None) -> dict[str, Any]:
    """The plain arguments of farm.train.loop.train_loop_per_worker for one job."""
    from farm.train import builders

    m = job.manifest
    return {
        "model": builders.model_config(m, job.data.label_names),
        "data": builders.data_config(m, job.data.stats),
        "progress": progress,
        "cpu_threads": cpu_threads,
        "baseline_adapter": job.baseline_ref,
        # the job as the training engine trains it (a pack of one): adapter, optimizer, identity, parity rows
        "member": builders.member_spec(m, job.job_id, job.data.train_rows, job.data.stats, job.pad_token_id,
                                       identity=job.identity, parity_rows=job.parity_rows),
    }


def fit(job: Prepared, *, on_progress: ProgressFn | None = None, storage_path: str | None = None,
        cpu_threads: int | None = None, settings: Settings | None = None) -> Fitted:
    """Train on Ray Train (resuming the job's run if it has checkpoints); the finished checkpoint."""

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from farm.placement import worker_placement
    from farm.raycluster import connect
    from farm.settings import Settings as _Settings
    from farm.train.loop import train_loop_per_worker
    from farm.train.trainer import farm_trainer

    settings = settings or _Settings.resolve()
    connect(settings=settings)
    m, job_id = job.manifest, job.job_id
    placement = worker_placement(m.resources.gpus, job_id)
    if placement.note:
        log.warning(placement.note)
        if on_progress:
            on_progress({"event": "cpu_fallback", "message": placement.note})
    # On this driver's node, like Ray Train's controller: losing the worker's node must not lose the
    # progress channel of the restarted worker.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = Queue(maxsize=10_000, actor_options={"num_cpus": 0, "scheduling_strategy": here})
    config = loop_config(job, progress, cpu_threads)
    store_path, store_fs = run_storage(storage_path or settings.storage_path)
    trainer = farm_trainer(
        train_loop_per_worker,
        config=config,
        settings=settings,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=placement.use_gpu,
                                     resources_per_worker=placement.resources),
        run_config=RunConfig(
            name=run_name(job_id),
            storage_path=store_path,
            storage_filesystem=store_fs,
            failure_config=FailureConfig(max_failures=m.resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    history: list[dict] = []
    stop = threading.Event()
    cost = AttemptCost(placement.gpus)
    drainer = threading.Thread(target=_drain, args=(progress, on_progress, stop, history, cost), daemon=True)
    drainer.start()
    try:
        result = trainer.fit()
    except FarmError:
        raise
    except Exception as exc:  # Ray Train wraps worker errors; report the root cause in one line
        raise TrainingError(f"job {job_id} ({m.name}): training failed: {_root_cause(exc)}") from exc
    finally:
        stop.set()
        drainer.join(timeout=5)
        try:
            progress.shutdown()
        except Exception:  # noqa: BLE001
            pass
    if result.checkpoint is None:
        raise TrainingError(f"job {job_id} ({m.name}): training ended without a final checkpoint")
    return Fitted(result.checkpoint, placement, history)


def publish(job: Prepared, fitted: Fitted, *, catalog: Catalog | None = None,
            before_publish: PublishGate | None = None, check_parity: ParityCheck | None = None,
            on_event: ProgressFn | None = None) -> AdapterVersion:
    """Publish the fitted adapter with its loss curve and farm.json; idempotent per job id.

    With `check_parity` and parity rows in the checkpoint, a version whose served logprobs differ from
    the trainer's beyond tolerance is not published (TrainingError). Afterwards the manifest's alias
    moves as its alias_policy allows (farm.train.gate); each decision goes to `on_event` as
    {"event": "gate", "message": ...}."""
    from farm.train import gate
    from farm.train.report import build_metadata, plot_loss_curve

    def say(message: str) -> None:
        log.info("job %s: %s", job.job_id, message)
        if on_event is not None:
            on_event({"event": "gate", "message": message})

    if catalog is None:
        from farm.catalog import Catalog

        catalog = Catalog()
    m, job_id = job.manifest, job.job_id
    with fitted.as_directory() as ckpt_dir, tempfile.TemporaryDirectory(prefix="farm-publish-") as out:
        ckpt = Path(ckpt_dir)
        if not (ckpt / FINAL_MARKER).exists():
            raise TrainingError(f"job {job_id}: the last checkpoint is not a finished adapter")
        state = read_state(ckpt)
        check_identity(state, job.identity, f"job {job_id}")
        final = state.get("final_metrics", {})
        for name in ADAPTER_FILES:
            if (ckpt / name).exists():
                shutil.copy2(ckpt / name, Path(out) / name)
        full_history = state.get("history", [])
        plot_loss_curve(full_history, Path(out) / "loss_curve.png", f"{m.name} — job {job_id}")
        metadata = build_metadata(
            job_id=job_id,
            manifest=m,
            base_fingerprint=job.fingerprint,
            data_stats=job.data.stats,
            label_names=job.data.label_names,
            final=final,
            history=full_history,
            device="cuda" if fitted.placement.use_gpu else "cpu",
            gpus=fitted.placement.gpus,
            wall_seconds=time.time() - job.started,
        )
        metadata.update(fitted.lineage)
        rows = state.get("parity_rows") or []
        if check_parity is not None and rows:
            q = metadata["quantization"]
            quant = {"mode": q["mode"], "double_quant": q["double_quant"], "compute_dtype": q["compute_dtype"]}
            record = gate.parity(rows, check_parity(m.base_model, quant, out, rows))
            metadata["parity"] = record
            what = (f"train/serve parity: max |logprob difference| {record['max_abs_logprob_diff']:.2e} over "
                    f"{record['tokens']} tokens of {record['rows']} eval rows (tolerance {record['tolerance']})")
            if not record["ok"]:
                say(f"not published: {what}")
                raise TrainingError(f"job {job_id}: not published: {what}: the served adapter would not "
                                    f"behave as trained (check the base, tokenizer and adapter config)")
            say(what)
        if before_publish is not None:
            before_publish()  # past this point the job ends published, whatever else is requested
        version = catalog.publish(m.customer, m.adapter, Path(out), metadata, idempotency_key=job_id)
    log.info("job %s published %s", job_id, version.ref)
    decision = gate.move_alias(catalog, m, version)
    if decision is not None:
        say(decision.reason)
    return version


def run_job(
    manifest: Manifest,
    *,
    job_id: str | None = None,
    on_progress: ProgressFn | None = None,
    catalog: Catalog | None = None,
    storage_path: str | None = None,
    cpu_threads: int | None = None,
    before_publish: PublishGate | None = None,
    check_parity: ParityCheck | None = None,
) -> AdapterVersion:
    """Train the manifest's adapter on Ray Train and publish it; returns the published version.

    `check_parity` (farm.parity.serving_logprobs where serving is installed) turns on the train/serve
    parity gate for causal LM jobs: the worker records a few eval rows' logprobs to compare."""
    from farm.train.gate import baseline_ref

    if catalog is None:
        from farm.catalog import Catalog

        catalog = Catalog()
    job = prepare(manifest, job_id or new_job_id())
    job.baseline_ref = baseline_ref(manifest, catalog)
    if check_parity is not None and manifest.task == "causal_lm":
        job.parity_rows = PARITY_ROWS
    fitted = fit(job, on_progress=on_progress, storage_path=storage_path, cpu_threads=cpu_threads)
    return publish(job, fitted, catalog=catalog, before_publish=before_publish, check_parity=check_parity,
                   on_event=on_progress)


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
