"""A create request's method and hyperparameters against the policy: "auto" becomes the policy
default, a number outside the policy is a 400 naming the field and the limit.

Where they come from, as OpenAI's API takes them: `method: {"type": "supervised", "supervised":
{"hyperparameters": {...}}}`, `method: {"type": "dpo", "dpo": {"hyperparameters": {..., "beta"}}}`,
or (legacy, supervised) a top-level `hyperparameters`."""

from __future__ import annotations

from typing import Any

from farm.finetune.errors import bad_request
from farm.finetune.policy import TrainingPolicy


def _number(value: Any, name: str, *, integer: bool) -> float | int | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and float(value) != int(value)):
        kind = "an integer" if integer else "a number"
        raise bad_request(f"{name} must be {kind} or \"auto\" (got {value!r})", name)
    return int(value) if integer else float(value)


METHODS = ("supervised", "dpo")
ALLOWED = {"supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
           "dpo": ("n_epochs", "batch_size", "learning_rate_multiplier", "beta")}
DEFAULT_BETA = 0.1  # OpenAI's documented starting point, TRL's default


def hyperparameters_of(body: dict) -> tuple[dict, str, str]:
    """The request's hyperparameters, the field name they came from and the method type."""
    method = body.get("method")
    kind = "supervised"
    if method is not None:
        if not isinstance(method, dict):
            raise bad_request(f"method must be an object like {{\"type\": \"supervised\"}} (got {method!r})", "method")
        kind = method.get("type")
        if kind not in METHODS:
            raise bad_request(f"method.type {kind!r} is not offered (allowed: {', '.join(METHODS)})", "method.type")
        section = method.get(kind)
        if section is not None and not isinstance(section, dict):
            raise bad_request(f"method.{kind} must be an object", f"method.{kind}")
        hp = (section or {}).get("hyperparameters") or {}
        where = f"method.{kind}.hyperparameters"
        if body.get("hyperparameters"):
            raise bad_request("give hyperparameters in method, not also at the top level", "hyperparameters")
    else:
        hp, where = body.get("hyperparameters") or {}, "hyperparameters"
    if not isinstance(hp, dict):
        raise bad_request(f"{where} must be an object", where)
    unknown = sorted(set(hp) - set(ALLOWED[kind]))
    if unknown:
        raise bad_request(f"{where}.{unknown[0]} is not a {kind} hyperparameter "
                          f"(allowed: {', '.join(ALLOWED[kind])})", f"{where}.{unknown[0]}")
    return hp, where, kind


def resolve(hp: dict, where: str, policy: TrainingPolicy, method: str = "supervised") -> dict:
    """{n_epochs, batch_size, learning_rate_multiplier} (and beta for dpo) as numbers, within the policy."""
    n = _number(hp.get("n_epochs"), f"{where}.n_epochs", integer=True)
    bs = _number(hp.get("batch_size"), f"{where}.batch_size", integer=True)
    lr = _number(hp.get("learning_rate_multiplier"), f"{where}.learning_rate_multiplier", integer=False)
    out = {
        "n_epochs": policy.default_epochs if n is None else n,
        "batch_size": policy.default_batch_size if bs is None else bs,
        "learning_rate_multiplier": 1.0 if lr is None else lr,
    }
    limits = (("n_epochs", 1, policy.max_epochs, "max_epochs"),
              ("batch_size", 1, policy.max_batch_size, "max_batch_size"))
    for key, low, high, name in limits:
        if not low <= out[key] <= high:
            raise bad_request(f"{where}.{key}={out[key]} is outside the policy: {low}..{high} "
                              f"({name} of this base is {high})", f"{where}.{key}")
    m = out["learning_rate_multiplier"]
    if not 0 < m <= policy.max_learning_rate_multiplier:
        raise bad_request(f"{where}.learning_rate_multiplier={m:g} is outside the policy: > 0 and <= "
                          f"{policy.max_learning_rate_multiplier:g} (max_learning_rate_multiplier)",
                          f"{where}.learning_rate_multiplier")
    if method == "dpo":
        beta = _number(hp.get("beta"), f"{where}.beta", integer=False)
        out["beta"] = DEFAULT_BETA if beta is None else beta
        if not out["beta"] > 0:
            raise bad_request(f"{where}.beta={out['beta']:g} must be > 0", f"{where}.beta")
    return out
