"""What the fine-tuning extension of a serve app needs, as plain data carried in ServeConfig.extra
to every replica: where files live, the queue, the scheduler to wake, and a policy per offered base."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from farm.finetune.policy import TrainingPolicy

EXTENSION = "farm.finetune.routes:extension"


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    bases: dict[str, TrainingPolicy]
    """Offered bases by served name (the `model` of a create request), each with its policy."""
    files_url: str
    """fsspec URL of the files/jobs store (FARM_FINETUNE, default file://$FARM_HOME/finetune)."""
    queue_db: str
    """The farm's queue database (FARM_QUEUE_DB, default $FARM_HOME/queue.db)."""
    scheduler_name: str | None = None
    """Scheduler actor to wake after a create/cancel; None = the one `farm up` recorded (if any)."""
    scheduler_namespace: str | None = None
    retry_window_s: float = Field(600.0, ge=0)
    """A client retry (x-stainless-retry-count > 0) with the same body within this window returns
    the job the first attempt created instead of starting another."""


def serve_extra(served_name: str, policy: TrainingPolicy, **fields) -> dict:
    """The ServeConfig.extra entries that mount the fine-tuning API with one offered base."""
    from farm.finetune.store import default_root
    from farm.settings import queue_db_path

    cfg = FinetuneConfig(bases={served_name: policy}, files_url=fields.pop("files_url", None) or default_root(),
                         queue_db=str(fields.pop("queue_db", None) or queue_db_path()), **fields)
    return {"extensions": [EXTENSION], "finetune": cfg.model_dump(mode="json")}
