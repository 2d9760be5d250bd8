"""Which served base an adapter version belongs to, from its lineage; refusing the others.

A trained version's farm.json records `base_model: {source, revision, sha256}` (sha256 =
farm.modeling.config_fingerprint of the base it was trained on): it goes to the served base with
that fingerprint, and to none if no served base has it (even if the source names one: a different
checkpoint under the same name is a different base). An imported version has only PEFT's
`base_model_name_or_path` (kept as `peft.base_model_name_or_path` in its farm.json): it is matched
against each served base's name, model source and folder name. An answer from the wrong base is
never given: no match is a 422 naming the adapter's base and the served ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from farm.serve.limits import ApiError


@dataclass(frozen=True)
class ServedBase:
    name: str
    """What clients call the bare base; the key of its deployment."""
    model: str
    """The model source as configured (local dir, s3:// URL, hub id)."""
    fingerprint: str | None = None
    """config_fingerprint of the served folder (None: not computed; lineage by fingerprint then fails)."""

    def describe(self) -> str:
        """Name and fingerprint (not the model path: callers are customers, the path is the operator's)."""
        return f"{self.name} (fingerprint {self.fingerprint[:12]})" if self.fingerprint else self.name


def _tail(s: str) -> str:
    return PurePosixPath(s.rstrip("/")).name.lower()


def lineage(metadata: dict[str, Any]) -> tuple[str | None, str | None]:
    """(base source or name, fingerprint) as recorded in a version's farm.json metadata."""
    rec = metadata.get("base_model")
    if isinstance(rec, dict) and (rec.get("sha256") or rec.get("source")):
        return (str(rec["source"]) if rec.get("source") else None), (str(rec["sha256"]) if rec.get("sha256") else None)
    peft = metadata.get("peft")
    name = peft.get("base_model_name_or_path") if isinstance(peft, dict) else None
    return (str(name) if name else None), None


def base_of(ref: str, metadata: dict[str, Any], bases: list[ServedBase]) -> ServedBase:
    """The served base an adapter version runs on; ApiError 422 when none of them is its base."""
    source, fingerprint = lineage(metadata or {})
    served = "; ".join(b.describe() for b in bases)
    if fingerprint:
        for b in bases:
            if b.fingerprint == fingerprint:
                return b
        same_name = [b for b in bases if source and (b.model == source or _tail(b.model) == _tail(source))]
        why = (f"the served base {same_name[0].name} has a different fingerprint" if same_name
               else "that base is not served here")
        raise ApiError(422, f"{ref} was trained on base {source} (fingerprint {fingerprint[:12]}): {why}. "
                            f"Served bases: {served}", "base_mismatch")
    if source:
        exact = [b for b in bases if source in (b.name, b.model)]
        loose = [b for b in bases if _tail(source) in (b.name.lower(), _tail(b.model))]
        match = exact or loose
        if len(match) == 1:
            return match[0]
        if match:
            raise ApiError(422, f"{ref} names base {source}, which matches several served bases "
                                f"({', '.join(b.name for b in match)}); re-import it with base_model_name_or_path "
                                f"set to one of them. Served bases: {served}", "base_mismatch")
        raise ApiError(422, f"{ref} was made for base {source}, which is not served here. Served bases: {served}",
                       "base_mismatch")
    if len(bases) == 1:
        return bases[0]  # nothing recorded to check against; the attach-time shape checks still apply
    raise ApiError(422, f"{ref} records no base model (no lineage, no base_model_name_or_path); cannot tell "
                        f"which base it is for. Served bases: {served}", "base_mismatch")
