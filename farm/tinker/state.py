"""Where `save_state` checkpoints live, and the `tinker://` paths that name them.

A checkpoint is a folder in run storage (FARM_STORAGE, a local path or s3://, what every node
reaches) under `farm-tinker/<tenant>/<model id>/weights/<name>/`: the LoRA as a stock PEFT folder
(adapter_config.json, adapter_model.safetensors) and `tinker_state.pt` (AdamW's moments and step
count, the LoRA's Tinker flags, the steps taken). The tenant is part of the key: a path names a
checkpoint of the caller's own models only, another tenant's path is simply not there.

The SDK names it `tinker://<model id>/weights/<name>` (exactly three segments after the scheme).
Beside the state file, `farm_tinker_meta.json` holds when it was saved and when it expires (the
`ttl_seconds` of save_state or of a later PUT .../ttl; null: never). An expired checkpoint is deleted
by the next sweep (the pack worker's, and any listing of its tenant's checkpoints) and is not loaded.
Beside a model's `weights/` folder, `farm_tinker_run.json` is its training run's record (base, LoRA
shape, the user's metadata), written at create, so RestClient's run calls answer after the session.
No heavy imports: fsspec only.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from farm.tinker.errors import TinkerApiError, bad

ROOT = "farm-tinker"
STATE_FILE = "tinker_state.pt"
META_FILE = "farm_tinker_meta.json"
RUN_FILE = "farm_tinker_run.json"  # the training run's record, beside its weights/ folder
TTL_MIN_S, TTL_MAX_S = 3600, 10 * 365 * 24 * 3600  # PUT .../ttl's bounds, as Tinker's
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,127}$")  # <session id>:train:<n>
KINDS = ("weights", "sampler_weights")


def check_name(name: str, field: str = "path") -> str:
    if not NAME.match(name or "") or ".." in name:
        raise bad(field, f"{name!r} is not a checkpoint name (letters, digits, '.', '_', '-'; up to 128; "
                         "no leading punctuation)")
    return name


def check_model_id(model_id: str, field: str = "model_id") -> str:
    """A model id that is safe as one storage path segment (what the farm hands out always is)."""
    if not MODEL_ID.match(model_id or "") or ".." in model_id:
        raise TinkerApiError(404, f"{field}: training run {model_id!r} not found", field)
    return model_id


def check_adapter_name(name: str, field: str = "path") -> str:
    """A sampler checkpoint's name is its catalog adapter name (`<tenant>/<name>@vN`): the catalog's rule."""
    from farm.manifest import NAME_RULE
    from farm.manifest import check_name as catalog_name

    try:
        return catalog_name(name)
    except ValueError:
        raise bad(field, f"{name!r} is not an adapter name: {NAME_RULE}") from None


def tinker_path(model_id: str, name: str, kind: str = "weights") -> str:
    return f"tinker://{model_id}/{kind}/{name}"


def parse_path(path: str, field: str = "path") -> tuple[str, str, str]:
    """(model id, kind, name) of `tinker://<model id>/<kind>/<name>`; a 400 naming the field otherwise."""
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise bad(field, f"{path!r} is not a tinker:// path")
    parts = path[len("tinker://"):].split("/")
    if len(parts) != 3 or not parts[0] or parts[1] not in KINDS:
        raise bad(field, f"{path!r}: expected tinker://<model id>/weights/<name>")
    return parts[0], parts[1], check_name(parts[2], field)


@dataclass
class StoredCheckpoint:
    """One save_state checkpoint in run storage."""

    tenant: str
    model_id: str
    name: str
    folder: str
    size_bytes: int
    created: float
    expires_at: float | None

    @property
    def path(self) -> str:
        return tinker_path(self.model_id, self.name)


@dataclass(frozen=True)
class TrainingRunRecord:
    """What the farm keeps of a Tinker model (its training run) after its session: what the SDK's
    `TrainingRun` and `WeightsInfoResponse` report, and the user's metadata (the cookbook keeps its
    renderer name there)."""

    tenant: str
    model_id: str
    base_model: str
    lora_rank: int
    train_attn: bool
    train_mlp: bool
    train_unembed: bool
    created: float
    user_metadata: dict[str, str] | None = None
    loaded_from: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "tenant"}

    @classmethod
    def from_json(cls, tenant: str, doc: dict) -> TrainingRunRecord:
        meta = doc.get("user_metadata")
        return cls(tenant, str(doc["model_id"]), str(doc["base_model"]), int(doc["lora_rank"]),
                   bool(doc["train_attn"]), bool(doc["train_mlp"]), bool(doc["train_unembed"]), float(doc["created"]),
                   {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else None, doc.get("loaded_from"))


class StateStore:
    """Checkpoint folders of one run storage."""

    def __init__(self, storage: str):
        from farm.settings import run_filesystem

        self.fs, self.root = run_filesystem(storage)

    def folder(self, tenant: str, model_id: str, name: str, kind: str = "weights") -> str:
        return f"{self.root}/{ROOT}/{tenant}/{check_model_id(model_id)}/{kind}/{check_name(name)}"

    def exists(self, folder: str) -> bool:
        return self.fs.exists(f"{folder}/{STATE_FILE}") and not self._expired(folder)

    def upload(self, local: Path, folder: str, *, overwrite: bool, ttl_seconds: int | None = None) -> None:
        """Copy a local checkpoint folder in; the state file goes last, so a half copy never looks complete."""
        if self.exists(folder):
            if not overwrite:
                raise TinkerApiError(400, f"path: checkpoint {folder.rsplit('/', 1)[-1]!r} exists (overwrite: false)",
                                     "path")
        if self.fs.exists(folder):  # replaced, or expired and not yet swept
            self.fs.rm(folder, recursive=True)
        self.fs.makedirs(folder, exist_ok=True)
        now = time.time()
        self._write_meta(folder, {"created": now, "expires_at": now + ttl_seconds if ttl_seconds else None})
        files = sorted(p for p in local.iterdir() if p.is_file())
        for p in sorted(files, key=lambda p: p.name == STATE_FILE):
            self.fs.put_file(str(p), f"{folder}/{p.name}")

    def download(self, folder: str, local: Path) -> Path:
        if not self.exists(folder):
            raise TinkerApiError(404, f"path: no checkpoint {folder.rsplit('/', 1)[-1]!r} of this model", "path")
        local.mkdir(parents=True, exist_ok=True)
        for entry in self.fs.ls(folder, detail=False):
            self.fs.get_file(entry, str(local / entry.rstrip("/").rsplit("/", 1)[-1]))
        return local

    # ---- training runs (RestClient.get_training_run, list_training_runs, weights_info) ----------
    def write_run(self, run: TrainingRunRecord) -> None:
        """The model's record, written when it is created (or created by a load)."""
        folder = f"{self.root}/{ROOT}/{run.tenant}/{check_model_id(run.model_id)}"
        self.fs.makedirs(folder, exist_ok=True)
        with self.fs.open(f"{folder}/{RUN_FILE}", "w") as f:
            json.dump(run.to_json(), f)

    def run(self, tenant: str, model_id: str) -> TrainingRunRecord | None:
        """The tenant's run of that id; None for a run it does not have (another tenant's included)."""
        return self._read_run(f"{self.root}/{ROOT}/{tenant}/{check_model_id(model_id)}/{RUN_FILE}", tenant)

    def runs(self, tenant: str) -> list[TrainingRunRecord]:
        """Every run of the tenant, newest first."""
        found = [self._read_run(f"{d.rstrip('/')}/{RUN_FILE}", tenant) for d in self._dirs(f"{self.root}/{ROOT}/{tenant}")]
        return sorted((r for r in found if r is not None), key=lambda r: (-r.created, r.model_id))

    def _read_run(self, path: str, tenant: str) -> TrainingRunRecord | None:
        try:
            with self.fs.open(path, "r") as f:
                return TrainingRunRecord.from_json(tenant, json.load(f))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None  # no record (a model made before records existed) or a half-written one

    # ---- listing, expiry, deletion, usage (the REST checkpoint calls and the storage quota) ----------
    def checkpoints(self, tenant: str, model_id: str | None = None) -> list[StoredCheckpoint]:
        """The tenant's complete checkpoints (of one model), oldest first; expired ones are deleted here."""
        base = f"{self.root}/{ROOT}/{tenant}"
        models = [check_model_id(model_id)] if model_id else [p.rstrip("/").rsplit("/", 1)[-1] for p in self._dirs(base)]
        found = []
        for mid in models:
            for folder in self._dirs(f"{base}/{mid}/weights"):
                folder = folder.rstrip("/")
                files = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in self.fs.ls(folder, detail=True)}
                if STATE_FILE not in files:
                    continue  # a save in progress (the state file goes last) or a broken one
                meta = self._read_meta(folder)
                if self._is_past(meta):
                    self.fs.rm(folder, recursive=True)
                    continue
                found.append(StoredCheckpoint(tenant, mid, folder.rsplit("/", 1)[-1], folder,
                                              sum(int(e.get("size") or 0) for e in files.values()),
                                              float(meta.get("created") or 0.0), meta.get("expires_at")))
        return sorted(found, key=lambda c: (c.created, c.name))

    def tenants(self) -> list[str]:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self._dirs(f"{self.root}/{ROOT}")]

    def sweep_expired(self) -> int:
        """Delete every tenant's expired checkpoints; how many."""
        gone = 0
        for tenant in self.tenants():
            base = f"{self.root}/{ROOT}/{tenant}"
            for model in self._dirs(base):
                for folder in self._dirs(f"{model.rstrip('/')}/weights"):
                    if self._is_past(self._read_meta(folder.rstrip("/"))):
                        self.fs.rm(folder.rstrip("/"), recursive=True)
                        gone += 1
        return gone

    def usage(self, tenant: str) -> tuple[int, int]:
        """(checkpoints, bytes) the tenant keeps."""
        found = self.checkpoints(tenant)
        return len(found), sum(c.size_bytes for c in found)

    def delete(self, folder: str) -> None:
        if not self.exists(folder):
            raise TinkerApiError(404, f"checkpoint {folder.rsplit('/', 1)[-1]!r} not found", "checkpoint_id")
        self.fs.rm(folder, recursive=True)

    def set_ttl(self, folder: str, ttl_seconds: int | None) -> float | None:
        """Expire the checkpoint ttl_seconds from now (None: never); its new expiry."""
        if not self.exists(folder):
            raise TinkerApiError(404, f"checkpoint {folder.rsplit('/', 1)[-1]!r} not found", "checkpoint_id")
        meta = self._read_meta(folder)
        meta["expires_at"] = time.time() + ttl_seconds if ttl_seconds else None
        self._write_meta(folder, meta)
        return meta["expires_at"]

    def _dirs(self, path: str) -> list[str]:
        if not self.fs.exists(path):
            return []
        return [e["name"] for e in self.fs.ls(path, detail=True) if e.get("type") == "directory"]

    def _read_meta(self, folder: str) -> dict:
        try:
            with self.fs.open(f"{folder}/{META_FILE}", "r") as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return {}  # saved before metas existed, or half written: never expires

    def _write_meta(self, folder: str, meta: dict) -> None:
        with self.fs.open(f"{folder}/{META_FILE}", "w") as f:
            json.dump(meta, f)

    def _expired(self, folder: str) -> bool:
        return self._is_past(self._read_meta(folder))

    @staticmethod
    def _is_past(meta: dict) -> bool:
        return meta.get("expires_at") is not None and float(meta["expires_at"]) <= time.time()
