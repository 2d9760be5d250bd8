"""Where `save_state` checkpoints live, and the `tinker://` paths that name them.

A checkpoint is a folder in run storage (FARM_STORAGE, a local path or s3://, what every node
reaches) under `farm-tinker/<tenant>/<model id>/weights/<name>/`: the LoRA as a stock PEFT folder
(adapter_config.json, adapter_model.safetensors) and `tinker_state.pt` (AdamW's moments and step
count, the LoRA's Tinker flags, the steps taken). The tenant is part of the key: a path names a
checkpoint of the caller's own models only, another tenant's path is simply not there.

The SDK names it `tinker://<model id>/weights/<name>` (exactly three segments after the scheme).
No heavy imports: fsspec only.
"""

from __future__ import annotations

import re
from pathlib import Path

from farm.tinker.errors import TinkerApiError, bad

ROOT = "farm-tinker"
STATE_FILE = "tinker_state.pt"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
KINDS = ("weights", "sampler_weights")


def check_name(name: str, field: str = "path") -> str:
    if not NAME.match(name or "") or ".." in name:
        raise bad(field, f"{name!r} is not a checkpoint name (letters, digits, '.', '_', '-'; up to 128; "
                         "no leading punctuation)")
    return name


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


class StateStore:
    """Checkpoint folders of one run storage."""

    def __init__(self, storage: str):
        from farm.settings import run_filesystem

        self.fs, self.root = run_filesystem(storage)

    def folder(self, tenant: str, model_id: str, name: str, kind: str = "weights") -> str:
        return f"{self.root}/{ROOT}/{tenant}/{model_id}/{kind}/{check_name(name)}"

    def exists(self, folder: str) -> bool:
        return self.fs.exists(f"{folder}/{STATE_FILE}")

    def upload(self, local: Path, folder: str, *, overwrite: bool) -> None:
        """Copy a local checkpoint folder in; the state file goes last, so a half copy never looks complete."""
        if self.exists(folder):
            if not overwrite:
                raise TinkerApiError(400, f"path: checkpoint {folder.rsplit('/', 1)[-1]!r} exists (overwrite: false)",
                                     "path")
            self.fs.rm(folder, recursive=True)
        self.fs.makedirs(folder, exist_ok=True)
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
