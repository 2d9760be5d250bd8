"""What a finished run leaves behind besides the weights: the loss-curve PNG and the lineage
metadata (farm.json content) that the catalog stores with the adapter."""

from __future__ import annotations

import platform
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from farm.costs import job_cost

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "ray", "datasets", "farm")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def plot_loss_curve(history: list[dict], path: Path, title: str) -> Path:
    """Train loss per step and eval loss where measured, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history if "loss" in h and not h.get("final")]
    loss = [h["loss"] for h in history if "loss" in h and not h.get("final")]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, label="train loss", linewidth=1)
    if ev:
        ax.plot([s for s, _ in ev], [v for _, v in ev], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def openai_metrics(final: dict, history: list[dict]) -> dict:
    """The final metrics under OpenAI's fine-tuning names: train_loss (last step), valid_loss (the
    last periodic eval, else the final one), full_valid_loss and full_valid_mean_token_accuracy (the
    whole eval set after training)."""
    out: dict[str, float] = {}
    train = [h["loss"] for h in history if "loss" in h and not h.get("final")]
    if train:
        out["train_loss"] = train[-1]
    periodic = [h["eval_loss"] for h in history if "eval_loss" in h and not h.get("final")]
    if "eval_loss" in final:
        out["valid_loss"] = periodic[-1] if periodic else final["eval_loss"]
        out["full_valid_loss"] = final["eval_loss"]
    if "eval_mean_token_accuracy" in final:
        out["full_valid_mean_token_accuracy"] = final["eval_mean_token_accuracy"]
    return out


def build_metadata(
    *,
    job_id: str,
    manifest: Any,
    base_fingerprint: str,
    data_stats: dict,
    label_names: list[str] | None,
    final: dict,
    history: list[dict],
    device: str,
    gpus: int,
    wall_seconds: float,
) -> dict:
    """The lineage record stored in the version's farm.json."""
    train_seconds = float(final.get("train_seconds", 0.0))
    metrics = {k: v for k, v in final.items() if k.startswith(("eval_", "baseline_"))}
    steps = [h for h in history if "loss" in h and not h.get("final")]
    if steps:
        metrics["train_loss"] = steps[-1]["loss"]
        for k in ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"):  # a dpo job's
            if k in steps[-1]:
                metrics["train_" + k] = steps[-1][k]
    metrics.update(openai_metrics(final, history))
    return {
        "job_id": job_id,
        "customer": manifest.customer,
        "adapter": manifest.adapter,
        "task": manifest.task,
        "label_names": label_names,
        "manifest": manifest.model_dump(mode="json"),
        "manifest_sha256": manifest.content_hash(),
        "base_model": {
            "source": manifest.base_model,
            "revision": manifest.revision,
            "sha256": base_fingerprint,
        },
        "quantization": {
            "mode": manifest.quantization,
            "double_quant": manifest.double_quant,
            "compute_dtype": manifest.compute_dtype,
        },
        "versions": library_versions(),
        "params": {
            "total": final.get("params_total"),
            "trainable": final.get("params_trainable"),
            "trainable_pct": (
                100.0 * final["params_trainable"] / final["params_total"] if final.get("params_total") else None
            ),
        },
        "footprint": {"base_bytes": final.get("base_footprint_bytes")},
        "datasets": data_stats,
        "metrics": metrics,
        "metrics_history": [
            {k: v for k, v in h.items() if k not in ("pid", "attempt_resumed_from", "final")} for h in history
        ],
        "tokens_trained": final.get("tokens"),
        "steps": final.get("step"),
        "stopped_early": final.get("stopped_early", False),
        "optimizer": final.get("optimizer"),
        "device": device,
        "wall_seconds": wall_seconds,
        "worker_seconds": train_seconds,
        # farm.costs: step time x GPUs, a CPU job counting as one accelerator (as the queue charges it).
        "accelerator_seconds": job_cost(final, gpus if device == "cuda" else 0)["accelerator_seconds"],
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
