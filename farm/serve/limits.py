"""Request limits and the one error type the API turns into an HTTP status.

Every refusal is an ApiError with a 4xx/503 status and a message that names the numbers involved;
nothing a client sends (or how many clients send it) produces a 500."""

from __future__ import annotations


class ApiError(Exception):
    """An error with an HTTP status. Pickles across Ray (all state lives in args)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", retry_after: float | None = None):
        super().__init__(status, message, type_, retry_after)

    status = property(lambda self: self.args[0])
    message = property(lambda self: self.args[1])
    type = property(lambda self: self.args[2])
    retry_after = property(lambda self: self.args[3])

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"


def not_found(model: str) -> ApiError:
    # Same words whether the adapter does not exist or belongs to someone else: no existence leak.
    return ApiError(404, f"model {model!r} not found", "not_found_error")


def overloaded(waiting: int, retry_after: float = 1.0) -> ApiError:
    return ApiError(503, f"server busy: {waiting} requests already waiting; retry later", "overloaded", retry_after)


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind a Ray task/actor error (RayTaskError.cause)."""
    seen = 0
    while getattr(exc, "cause", None) is not None and seen < 5:
        exc = exc.cause
        seen += 1
    return exc


def check_max_tokens(requested: int | None, cap: int) -> int:
    """The effective max_tokens: the cap when omitted; over the cap is a 400."""
    if requested is None:
        return cap
    if requested > cap:
        raise ApiError(400, f"max_tokens {requested} is over this server's cap of {cap}")
    return requested


def check_context(prompt_tokens: int, max_tokens: int, context_length: int) -> None:
    """prompt tokens + max_tokens must fit in the model's context."""
    if prompt_tokens + max_tokens > context_length:
        raise ApiError(
            400,
            f"prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
            f"{prompt_tokens + max_tokens} > the model's context length of {context_length}",
        )
    if prompt_tokens == 0:
        raise ApiError(400, "prompt is empty (0 tokens)")
