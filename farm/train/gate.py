"""The publish gate: whether a trained version may be published, and whether the customer's alias moves to it.

Two checks, both recorded in farm.json and in the job's events:
  * train/serve parity: the trainer's per-token logprobs on a few eval rows against the serving
    engine's on the same NF4 base (the caller supplies the serving side, `ParityCheck`: train never
    imports serve). Beyond `PARITY_TOLERANCE` the version is not published.
  * alias policy: `always` moves the manifest's alias to the new version; `if_better` only when the
    new version's eval loss is not worse than the version the alias points at, both scored on this
    job's eval rows in the worker (farm.train.engine.Engine.evaluate_baseline), else on the figures farm.json
    recorded when both versions were evaluated on the same eval file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from farm.catalog import AdapterVersion, Catalog
    from farm.manifest import Manifest

PARITY_TOLERANCE = 0.05
"""Largest allowed |trainer - server| logprob of one token (nats). fp32 NF4 on CPU agrees to ~1e-5;
a mismatched template, tokenizer, adapter scaling or base shows up as whole nats."""

ParityCheck = Callable[[str, dict, str, list[dict]], list[list[float]]]
"""(base_model source, quantization kwargs, adapter folder, rows) -> the server's logprobs per row:
the same token positions as each row's trainer `logprobs` (echo scoring of `input_ids`)."""


@dataclass(frozen=True)
class AliasDecision:
    move: bool
    reason: str
    previous: int | None = None
    """The version the alias pointed at (None: unset)."""


def parity(rows: list[dict], served: list[list[float]]) -> dict:
    """farm.json's parity record: the max |trainer - server| token logprob over the rows."""
    diffs = [abs(a - b) for row, got in zip(rows, served) for a, b in zip(row["logprobs"], got)]
    lengths_ok = all(len(r["logprobs"]) == len(g) for r, g in zip(rows, served)) and len(rows) == len(served)
    worst = max(diffs) if diffs else 0.0
    return {"max_abs_logprob_diff": worst if lengths_ok else float("inf"), "tolerance": PARITY_TOLERANCE,
            "rows": len(rows), "tokens": len(diffs), "ok": lengths_ok and worst <= PARITY_TOLERANCE}


def baseline_ref(manifest: Manifest, catalog: Catalog) -> dict | None:
    """{"catalog": url, "ref": customer/adapter@vN}: the version the manifest's alias points at now,
    when if_better needs a comparison (the worker fetches it from that catalog: a worker process does
    not see the driver's FARM_HOME)."""
    from farm.errors import AdapterNotFound

    if manifest.alias is None or manifest.alias_policy != "if_better":
        return None
    try:
        return {"catalog": catalog.url, "ref": catalog.resolve(f"{manifest.name}@{manifest.alias}").ref}
    except AdapterNotFound:
        return None


def decide(policy: str, alias: str, new: AdapterVersion, current: AdapterVersion | None) -> AliasDecision:
    """Whether `alias` moves from `current` to `new` under `policy` (pure: reads the versions' farm.json)."""
    name = f"{new.name}@{alias}"
    prev = current.version if current is not None else None
    if current is None:
        return AliasDecision(True, f"alias {name} set to v{new.version} (it was unset)", prev)
    if policy == "always":
        return AliasDecision(True, f"alias {name} moved v{prev} -> v{new.version} (alias_policy always)", prev)
    m = (new.metadata or {}).get("metrics", {})
    new_loss = m.get("full_valid_loss")
    old_loss, how = m.get("baseline_eval_loss"), "both scored on this job's eval data"
    if old_loss is None:
        old_m = (current.metadata or {}).get("metrics", {})
        same_eval = _eval_sha(new) is not None and _eval_sha(new) == _eval_sha(current)
        if same_eval:
            old_loss, how = old_m.get("full_valid_loss"), "recorded on the same eval file"
        else:
            why = m.get("baseline_error") or "its eval data differs and it was not re-scored"
            return AliasDecision(False, f"alias {name} stays on v{prev}: no comparable eval loss for v{prev} ({why})",
                                 prev)
    if new_loss is None or old_loss is None:
        return AliasDecision(False, f"alias {name} stays on v{prev}: no eval loss to compare (alias_policy if_better)",
                             prev)
    verdict = f"eval loss {new_loss:.4f} vs {old_loss:.4f} of v{prev}, {how}"
    if new_loss <= old_loss:
        return AliasDecision(True, f"alias {name} moved v{prev} -> v{new.version}: {verdict}", prev)
    return AliasDecision(False, f"alias {name} stays on v{prev}: v{new.version} is worse ({verdict})", prev)


def _eval_sha(v: AdapterVersion) -> Any:
    ds = (v.metadata or {}).get("datasets") or {}
    ev = ds.get("eval") if isinstance(ds, dict) else None
    return ev.get("sha256") if isinstance(ev, dict) else None


def move_alias(catalog: Catalog, manifest: Manifest, new: AdapterVersion) -> AliasDecision | None:
    """Apply the manifest's alias policy to a just-published version (compare-and-swap against the
    version it was judged against); None when the manifest names no alias."""
    from farm.errors import AdapterNotFound, CatalogError

    if manifest.alias is None:
        return None
    try:
        current = catalog.resolve(f"{manifest.name}@{manifest.alias}")
    except AdapterNotFound:
        current = None
    decision = decide(manifest.alias_policy, manifest.alias, new, current)
    if decision.move:
        try:
            catalog.set_alias(new.ref, manifest.alias, expect=decision.previous)
        except CatalogError as exc:  # moved by someone else meanwhile: theirs stands
            return AliasDecision(False, f"alias {manifest.name}@{manifest.alias} not moved: {exc}", decision.previous)
    return decision
