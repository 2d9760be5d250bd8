"""The `farm` engine: farm/serve/engine.py's Engine (transformers forwards, grouped LoRA, NF4 on
CPU or CUDA) as a ServingEngine. It serves everything the catalog holds, classifiers included."""

from __future__ import annotations

from pathlib import Path

from farm.serve.engine import Engine
from farm.serve.engines.base import Slot


class FarmEngine(Engine):
    kind = "farm"

    def attach(self, path: Path, labels: list[str] | None = None, *, name: str | None = None) -> Slot:
        return super().attach(path, labels)  # slot names are the engine's own; `name` is not needed
