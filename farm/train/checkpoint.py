"""What a training checkpoint holds and how it is written and read back: one owner for its layout.

A checkpoint folder holds the adapter (PEFT's files), the trainer state (`trainer_state.pt`:
optimizer, LR scheduler, RNG, data position, history — tensors, numbers, strings and dicts only, so
it loads with `torch.load(weights_only=True)`: run storage is shared, and an unrestricted unpickle
of a file there would run whatever code it holds), the best adapter weights seen so far when early
stopping is on (`best_adapter.safetensors`, so that a resumed run still publishes the best ones), and
a `FINAL` marker once training is over. The state also names the job it belongs to (`identity`),
so that run storage reused under another job's id is refused instead of resumed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from farm.errors import TrainingError

STATE_FILE = "trainer_state.pt"
BEST_FILE = "best_adapter.safetensors"
FINAL_MARKER = "FINAL"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def write(folder: str | Path, model, optimizer, scheduler, state: dict, *, final: bool,
          best_weights: dict | None = None) -> Path:
    """Write adapter, trainer state and (if any) the best weights into `folder`."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    torch.save(
        {
            **state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        folder / STATE_FILE,
    )
    if best_weights is not None:
        save_file({k: v.detach().cpu().clone() for k, v in best_weights.items()}, str(folder / BEST_FILE))
    if final:
        (folder / FINAL_MARKER).touch()
    return folder


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


def restore(folder: str | Path, model, optimizer, scheduler, identity: dict | None = None
            ) -> tuple[dict, dict | None]:
    """Load a checkpoint into model/optimizer/scheduler/RNG; returns (state, best_weights or None)."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    state = read_state(folder)
    check_identity(state, identity, f"checkpoint {folder}")
    set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    best = load_file(str(folder / BEST_FILE)) if (folder / BEST_FILE).exists() else None
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    torch.set_rng_state(state.pop("torch_rng"))
    cuda_rng = state.pop("cuda_rng", None)
    if cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)
    return state, best
