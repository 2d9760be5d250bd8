"""What the Tinker extension of a serve app needs, as plain data carried in ServeConfig.extra."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

EXTENSION = "farm.tinker.routes:extension"


class TinkerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    base_model: str
    """The base the pack worker holds: local folder, s3:// URL or hub id (the serve config's)."""
    served_name: str
    """Its name for clients: what `get_server_capabilities` lists and `create_model` takes as base_model."""
    quantization: str = "nf4"
    """nf4 | fp4 | int8 | none: how the worker holds the base (the training engine's loader)."""
    num_cpus: float = Field(1.0, gt=0)
    """Ray CPUs of the pack worker (also its torch threads)."""
    num_gpus: float = Field(0.0, ge=0)
    """Ray GPUs of the pack worker; > 0 puts the base on CUDA."""
    window_ms: float = Field(20.0, ge=0)
    """After the first operation of a quiet worker arrives, how long it waits for others to group with it."""
    poll_s: float = Field(5.0, gt=0, le=30)
    """How long `retrieve_future` holds a pending future before answering try_again (the SDK re-polls
    at once, so this is the long-poll that keeps it from spinning; its read timeout is 45 s)."""
    max_request_tokens: int = Field(262_144, ge=1)
    """Most tokens in one forward_backward request (the SDK splits a batch into ~5 MB chunks)."""
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """Largest request body (forward_backward protobuf included)."""
    catalog_url: str | None = None
    """Where save_weights_for_sampler publishes versions (the serve app's catalog)."""
    storage: str | None = None
    """Run storage (FARM_STORAGE) where save_state checkpoints go; None = the worker's FARM_STORAGE."""
    idle_evict_s: float | None = Field(600.0, gt=0)
    """A model with no operation for this long leaves the worker's memory: its LoRA, AdamW moments and
    counters go to the worker's local disk and come back, unchanged, with its next operation (never
    while gradients wait for an optim_step). None keeps every model resident until its session ends."""
    session_timeout_s: float | None = Field(600.0, gt=0)
    """A session with no heartbeat (the SDK sends one every 10 s) and no operation for this long is
    ended as `close` ends it: its models leave the worker, their snapshots are deleted, what they
    saved stays. None: sessions end only when closed."""
    max_stored_bytes: int | None = Field(10 * 1024**3, ge=1)
    """Bytes one tenant may keep: its save_state checkpoints (run storage) and its named sampler weights
    (catalog versions), all its models together; a save over it fails, naming the tenant's total. None: no
    limit. Ephemeral snapshots are not counted: `sampler_snapshots_kept` bounds them."""
    sampler_snapshots_kept: int = Field(4, ge=1)
    """Ephemeral snapshots (save_weights_and_get_sampling_client) kept per model: a newer one deletes the
    oldest, whose sampling clients then get a 410; the session's end deletes them all."""
    queue_db: str | None = None
    """The farm's queue database, whose `usage` table keeps each tenant's Tinker use (`farm status`, the
    billing endpoint); None = the worker's FARM_QUEUE_DB. `mount` sets this farm's."""
    usage_flush_s: float = Field(10.0, gt=0)
    """How often the worker adds its pending usage to the queue database (a worker that dies loses at
    most this much; the Ray counters have it all)."""
    expiry_sweep_s: float = Field(600.0, gt=0)
    """How often the pack worker deletes expired checkpoints (save_state's ttl_seconds) of every tenant."""
    sample_timeout_s: float = Field(900.0, gt=0)
    """A sample's future fails after this long unanswered (its ingress replica died mid-sample)."""
    result_ttl_s: float = Field(1800.0, gt=0)
    """How long a finished future's result is kept for the SDK to fetch (and fetch again after a lost reply)."""
    worker_name: str | None = None
    """The pack worker's Ray actor name; default `farm-tinker-<served_name>`."""
    worker_namespace: str = "farm"
    """Its Ray namespace (the farm's, beside the scheduler), so operators and tests find it by name."""

    @property
    def actor_name(self) -> str:
        return self.worker_name or f"farm-tinker-{self.served_name}"


def mount(serve_cfg, **fields) -> TinkerConfig:
    """Mount the Tinker API on a serve config (`ServeConfig`): its base, beside any other extension."""
    from farm.settings import catalog_url, queue_db_path, storage_path

    fields.setdefault("storage", storage_path())  # resolved here: the worker writes where this farm reads
    fields.setdefault("queue_db", str(queue_db_path()))  # and adds its usage where `farm status` reads
    fields.setdefault("catalog_url", serve_cfg.catalog_url or catalog_url())  # and publishes where it serves from
    cfg = TinkerConfig(base_model=serve_cfg.base_model, served_name=serve_cfg.served_name,
                       quantization=fields.pop("quantization", serve_cfg.quantization),
                       num_gpus=fields.pop("num_gpus", 1.0 if serve_cfg.gpus_per_replica else 0.0), **fields)
    extensions = list(serve_cfg.extra.get("extensions", ()))
    if EXTENSION not in extensions:
        extensions.append(EXTENSION)
    serve_cfg.extra["extensions"] = extensions
    serve_cfg.extra["tinker"] = cfg.model_dump(mode="json")
    return cfg
