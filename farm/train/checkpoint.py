"""What a training checkpoint holds and how it is read back: one owner for its layout.

A checkpoint folder holds the adapter (PEFT's files, a member's saved modules such as a seq_cls head
included), the trainer state (`trainer_state.pt`: optimizer, LR scheduler, RNG, data position,
history — tensors, numbers, strings and dicts only, so it loads with `torch.load(weights_only=True)`:
run storage is shared, and an unrestricted unpickle of a file there would run whatever code it
holds), the best adapter weights seen so far when early stopping is on (`best_adapter.safetensors`,
so that a resumed run still publishes the best ones), and a `FINAL` marker once training is over.
The state also names the job it belongs to (`identity`), so that run storage reused under another
job's id is refused instead of resumed. The training engine writes and restores it
(farm.train.engine.Engine.write_checkpoint / admit(resume=...)); the driver reads the final one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from farm.errors import TrainingError

STATE_FILE = "trainer_state.pt"
BEST_FILE = "best_adapter.safetensors"
FINAL_MARKER = "FINAL"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def read_state(folder: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint folder (tensors and plain values only), plus `final`."""
    import torch

    folder = Path(folder)
    try:
        state = torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - unpickling error, truncated file
        raise TrainingError(f"checkpoint {folder}: cannot read {STATE_FILE}: {exc}") from None
    state["final"] = (folder / FINAL_MARKER).exists()
    return state


def check_identity(state: dict, identity: dict | None, where: str) -> None:
    """Refuse a checkpoint that another job (other customer, other manifest) wrote under this run name."""
    if not identity:
        return
    theirs = state.get("identity")
    if theirs is not None and theirs != identity:
        raise TrainingError(
            f"{where}: the run storage of job {identity.get('job_id')!r} holds a checkpoint of another job "
            f"(customer {theirs.get('customer')!r}, manifest {str(theirs.get('manifest_sha256'))[:12]}); "
            f"job ids are not reusable across jobs — pick a new one"
        )
