"""The one error type of the fine-tuning API: rendered as OpenAI's `{"error": {...}}` body."""

from __future__ import annotations


class ApiError(Exception):
    """An HTTP error with OpenAI's body: message, type, param (the request field at fault), code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                              409: "invalid_request_error", 413: "invalid_request_error",
                              429: "rate_limit_error"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found(what: str, ident: str, param: str | None = None) -> ApiError:
    """The same answer for missing and for another customer's object: ids reveal nothing."""
    return ApiError(404, f"no {what} {ident!r}", param=param, code="not_found")


def quota(message: str) -> ApiError:
    return ApiError(429, message, code="quota_exceeded")
