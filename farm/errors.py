"""Exceptions only. Every error a user can cause is a FarmError whose message says what was wrong,
where, and what is allowed; the CLI prints it without a traceback."""

from __future__ import annotations


class FarmError(Exception):
    """Base of all errors the farm reports to users."""


class SettingsError(FarmError, ValueError):
    """An environment setting (FARM_*) holds a value the farm cannot use."""


class ManifestError(FarmError):
    """A job manifest is invalid. Carries every problem found, not just the first."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


class ServeConfigError(ManifestError):
    """A serve config file is invalid (same shape as a manifest error: every problem, with its path)."""


class DataError(FarmError):
    """A dataset cannot be used for training (missing column, empty file, bad label, ...)."""


class ModelError(FarmError):
    """A base model cannot be found or loaded."""


class CatalogError(FarmError):
    """Adapter catalog failure."""


class RefError(CatalogError):
    """An adapter reference string is malformed or unsafe."""


class AdapterNotFound(CatalogError):
    """No such customer/adapter/version (or not visible to the caller)."""


class IntegrityError(CatalogError):
    """A stored file does not match the hash recorded when it was published."""


class QueueError(FarmError):
    """Job queue failure."""


class JobNotFound(QueueError):
    """No job with that id."""


class TrainingError(FarmError):
    """A training run failed."""


class ClusterError(FarmError):
    """The local Ray head or the farm's scheduler could not be started, reached or stopped."""


class QuotaExceeded(QueueError):
    """A submit would take a customer past its limit of active jobs (checked in the submit's transaction)."""

    def __init__(self, customer: str, active: int, limit: int):
        self.customer, self.active, self.limit = customer, active, limit
        super().__init__(f"{customer} has {active} jobs queued or running, the limit is {limit}")


class IdempotencyMismatch(QueueError):
    """An idempotency key was used before with a different request."""
