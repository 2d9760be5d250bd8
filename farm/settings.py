"""Where the farm keeps things. Environment variables only; no heavy imports.

FARM_HOME     (default ~/.farm) holds the local catalog, Ray Train run storage, logs, the queue database.
FARM_CATALOG  any fsspec URL for the adapter catalog (file://..., s3://bucket/prefix); S3-compatible
              stores use the standard AWS_ENDPOINT_URL.
FARM_STORAGE  Ray Train run storage (checkpoints); any pyarrow-supported URI. Default $FARM_HOME/runs.
"""

from __future__ import annotations

import os
from pathlib import Path


def farm_home() -> Path:
    return Path(os.environ.get("FARM_HOME") or Path.home() / ".farm").expanduser().resolve()


def catalog_url() -> str:
    url = os.environ.get("FARM_CATALOG")
    if url:
        return url
    return (farm_home() / "catalog").as_uri()


def storage_path() -> str:
    """Ray Train run storage (checkpoints). A local path or a URI all Ray nodes can reach."""
    return os.environ.get("FARM_STORAGE") or str(farm_home() / "runs")


def queue_db_path() -> Path:
    return Path(os.environ.get("FARM_QUEUE_DB") or farm_home() / "queue.db")


def logs_dir() -> Path:
    return farm_home() / "logs"
