"""Where the farm keeps things and what it forwards to Ray processes. Environment variables only;
no heavy imports.

FARM_HOME     (default ~/.farm) holds the local catalog, Ray Train run storage, logs, the queue database.
FARM_CATALOG  any fsspec URL for the adapter catalog (file://..., s3://bucket/prefix); S3-compatible
              stores use the standard AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3).
FARM_STORAGE  Ray Train run storage (checkpoints); any pyarrow-supported URI. Default $FARM_HOME/runs.
FARM_QUEUE_DB the queue's SQLite file. Default $FARM_HOME/queue.db.
FARM_TRAIN_THREADS  torch threads of a CPU training worker (default: every core the worker may use).
              Set it where several workers share a node's cores: two 2-thread workers on 2 cores
              train ~3x slower per step than two 1-thread ones (their OpenMP threads fight).
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S  how often Ray Train's controller polls a farm run's worker
              (default 1.0 for farm runs; Ray's own default is 2 s).
FARM_FINETUNE the fine-tuning API's files and records (any fsspec URL). Default $FARM_HOME/finetune.
FARM_CACHE    downloads and converted models (`make models`, bench/quality.py). Default
              $XDG_CACHE_HOME/farm, else ~/.cache/farm.
FARM_VLLM_PYTHON  the Python of an environment with vLLM (`--engine vllm`).
FARM_AUTOSCALING_CONFIG  the autoscaler's cluster config the scheduler reads slot limits from.
HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE  read the way huggingface_hub reads them (1/ON/YES/TRUE, any case).

`Settings.resolve()` reads them once into a frozen value that callers pass on; the module-level
functions are shorthands for `Settings.resolve().<field>`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.errors import SettingsError

# What Ray processes started for the farm (the scheduler's actor and tasks, Ray Train's controller and
# workers, Serve replicas) get from the process that starts them, so they see the same farm: its
# folders, its S3 endpoint and credentials, the hub's offline switches and the vLLM environment's
# Python (serve replicas). The one list: farm.raycluster.connect, the scheduler and `farm serve` use it.
FORWARDED_ENV = ("FARM_HOME", "FARM_CATALOG", "FARM_STORAGE", "FARM_QUEUE_DB", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                 "TOKENIZERS_PARALLELISM", "FARM_VLLM_PYTHON", "FARM_TRAIN_THREADS")
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
DEFAULT_TRAIN_POLL_S = 1.0


@dataclass(frozen=True)
class Settings:
    home: Path
    """FARM_HOME."""
    catalog_url: str
    """FARM_CATALOG, default file://$FARM_HOME/catalog."""
    storage_path: str
    """FARM_STORAGE: Ray Train run storage (checkpoints), a local path or a URI all nodes reach."""
    queue_db: Path
    """FARM_QUEUE_DB, default $FARM_HOME/queue.db."""
    logs_dir: Path
    """$FARM_HOME/logs."""
    s3_endpoint: str | None
    """AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL: an S3-compatible store's endpoint (None = AWS)."""
    train_poll_s: float
    """RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for farm runs."""
    forwarded: tuple[tuple[str, str], ...]
    """The FORWARDED_ENV variables that are set, as (name, value) pairs."""
    finetune_url: str
    """FARM_FINETUNE, default file://$FARM_HOME/finetune."""
    cache_dir: Path
    """FARM_CACHE, else $XDG_CACHE_HOME/farm, else ~/.cache/farm."""
    vllm_python: str | None
    """FARM_VLLM_PYTHON as given (None when unset)."""
    autoscaling_config: str | None
    """FARM_AUTOSCALING_CONFIG as given (None when unset)."""
    hub_offline: bool
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set to a true value, by huggingface_hub's own rule."""
    train_threads: int | None = None
    """FARM_TRAIN_THREADS: torch threads of a CPU training worker (None: every core it may use)."""

    @classmethod
    def resolve(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path(env.get("FARM_HOME") or Path.home() / ".farm").expanduser().resolve()
        try:
            poll = float(env.get(TRAIN_POLL_ENV) or DEFAULT_TRAIN_POLL_S)
        except ValueError:
            poll = DEFAULT_TRAIN_POLL_S
        return cls(
            home=home,
            catalog_url=env.get("FARM_CATALOG") or (home / "catalog").as_uri(),
            storage_path=env.get("FARM_STORAGE") or str(home / "runs"),
            queue_db=Path(env.get("FARM_QUEUE_DB") or home / "queue.db"),
            logs_dir=home / "logs",
            s3_endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            train_poll_s=poll,
            forwarded=tuple((k, env[k]) for k in FORWARDED_ENV if env.get(k)),
            finetune_url=env.get("FARM_FINETUNE") or (home / "finetune").as_uri(),
            cache_dir=Path(env.get("FARM_CACHE") or Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "farm"),
            vllm_python=env.get("FARM_VLLM_PYTHON") or None,
            autoscaling_config=env.get("FARM_AUTOSCALING_CONFIG") or None,
            hub_offline=_is_true(env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE")),
            train_threads=_whole_number("FARM_TRAIN_THREADS", env.get("FARM_TRAIN_THREADS")),
        )

    def cpu_train_threads(self) -> int:
        """The torch threads a CPU training worker uses: FARM_TRAIN_THREADS, else every core it may use."""
        return self.train_threads or len(os.sched_getaffinity(0))

    def ray_env(self) -> dict[str, str]:
        """Environment for Ray processes of this farm: the forwarded variables, FARM_HOME resolved."""
        return {**dict(self.forwarded), "FARM_HOME": str(self.home)}

    def storage_options(self, url: str) -> dict:
        """fsspec options for a URL: S3 URLs go to the configured S3-compatible endpoint."""
        if url.startswith("s3://") and self.s3_endpoint:
            return {"client_kwargs": {"endpoint_url": self.s3_endpoint}}
        return {}


def _whole_number(name: str, value: str | None) -> int | None:
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise SettingsError(f"{name}={value!r}: expected a whole number >= 1, or unset")
    return number


def _is_true(value: str | None) -> bool:
    """huggingface_hub's reading of a boolean environment variable (constants._is_true)."""
    return value is not None and value.upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return Settings.resolve().hub_offline


def farm_home() -> Path:
    return Settings.resolve().home


def catalog_url() -> str:
    return Settings.resolve().catalog_url


def storage_path() -> str:
    """Ray Train run storage (checkpoints). A local path or a URI all Ray nodes can reach."""
    return Settings.resolve().storage_path


def queue_db_path() -> Path:
    return Settings.resolve().queue_db


def logs_dir() -> Path:
    return Settings.resolve().logs_dir


def s3_endpoint() -> str | None:
    """The one place the farm finds the S3 endpoint (AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL)."""
    return Settings.resolve().s3_endpoint


def storage_options(url: str) -> dict:
    return Settings.resolve().storage_options(url)


def run_filesystem(storage: str) -> tuple[Any, str]:
    """(fsspec filesystem, root) of run storage (FARM_STORAGE): a local path or any fsspec URL, S3 at
    the configured endpoint. S3 without listing or instance caches: a resume reads what another node
    (or attempt) just wrote and must never answer from a stale listing."""
    import fsspec

    if "://" not in storage:
        storage = "file://" + str(Path(storage).expanduser().absolute())
    options = storage_options(storage)
    if storage.startswith("s3://"):
        options.update(use_listings_cache=False, skip_instance_cache=True)
    fs, root = fsspec.core.url_to_fs(storage, **options)
    return fs, root.rstrip("/")
