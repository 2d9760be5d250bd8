"""The one error type of the Tinker API: an HTTP status and a message naming the field and value.

Every refusal is a 4xx with a JSON body. The SDK retries 408, 409, 429 and 5xx for minutes (402 for
an hour) and takes a 400 with an empty body for a proxy's rejection, so a refusal is never one of
those: 400 (bad input), 401 (no or unknown key), 404 (no such thing, or another tenant's), 413 (too
large), 422 (a valid request the farm does not support yet)."""

from __future__ import annotations

from farm.errors import FarmError


class TinkerApiError(FarmError):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        if status in (402, 408, 409, 429) or not 400 <= status < 500:
            raise ValueError(f"a Tinker refusal must not be {status}: the SDK would retry it")
        self.status, self.message, self.field = status, message, field

    def body(self) -> dict:
        return {"error": self.message, "field": self.field, "category": "user"}


def bad(field: str, message: str) -> TinkerApiError:
    """400 naming the field: `<field>: <message>`."""
    return TinkerApiError(400, f"{field}: {message}", field)


def not_found(what: str, value: str) -> TinkerApiError:
    """404: also what another tenant's model or future looks like (no hint that it exists)."""
    return TinkerApiError(404, f"{what} {value!r} not found", what)
