"""A create request's hyperparameters against the policy: "auto" becomes the policy default, a
number outside the policy is a 400 naming the field and the limit."""

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


def hyperparameters_of(body: dict) -> tuple[dict, str]:
    """The request's hyperparameters and the field name they came from."""
    method = body.get("method")
    if method is not None:
        if not isinstance(method, dict) or method.get("type", "supervised") != "supervised":
            kind = method.get("type") if isinstance(method, dict) else method
            raise bad_request(f"method.type {kind!r} is not offered (allowed: supervised)", "method.type")
        hp = ((method.get("supervised") or {}).get("hyperparameters")) or {}
        where = "method.supervised.hyperparameters"
    else:
        hp, where = body.get("hyperparameters") or {}, "hyperparameters"
    if not isinstance(hp, dict):
        raise bad_request(f"{where} must be an object", where)
    unknown = sorted(set(hp) - {"n_epochs", "batch_size", "learning_rate_multiplier"})
    if unknown:
        raise bad_request(f"{where}.{unknown[0]} is not a supervised hyperparameter "
                          "(allowed: n_epochs, batch_size, learning_rate_multiplier)", f"{where}.{unknown[0]}")
    return hp, where


def resolve(hp: dict, where: str, policy: TrainingPolicy) -> dict:
    """{n_epochs, batch_size, learning_rate_multiplier} as numbers, within the policy."""
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
    return out
