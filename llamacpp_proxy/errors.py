"""The ProxyError hierarchy: every failure a client can see, with its status and OpenAI body.

Every ProxyError subclass lives here, so one file lists what a client can be told.
"""

from __future__ import annotations

from typing import Any


def drop_tracebacks(error: BaseException | None) -> None:
    """Forget the tracebacks of a failure kept on an object (and of the errors it was
    raised from). Each holds the frames of every coroutine it went through, and those frames
    hold the object that kept it: a reference cycle only the cyclic collector frees. Call it
    once nothing will raise `error` again."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.__traceback__ = None
        error = error.__cause__ or error.__context__


class ProxyError(Exception):
    """An error rendered to the client as `{"error": {"message", "type", "param", "code"}}`."""

    status = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error object for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(ProxyError):
    """The request body or its parameters are wrong (400)."""

    status = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """The prompt does not fit the model's context (400, as OpenAI reports it)."""

    code = "context_length_exceeded"


class AuthenticationFailed(ProxyError):
    """Missing or unknown API key (401)."""

    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(ProxyError):
    """A valid key that may not use this endpoint (403), e.g. a non-admin key on /status."""

    status = 403
    error_type = "invalid_request_error"
    code = "permission_denied"


class NotFound(ProxyError):
    """Unknown path or model (404)."""

    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    """No pool serves this model, or the key may not use it (404, as OpenAI answers both)."""

    code = "model_not_found"

    def __init__(self, model: str) -> None:
        # The same text for "unknown" and "not yours", so a key cannot probe which models
        # exist; the name is cut short because it comes from the client.
        shown = model if len(model) <= 100 else model[:100] + "..."
        super().__init__(
            f"The model '{shown}' does not exist or you do not have access to it.",
            param="model",
        )


class MethodNotAllowed(ProxyError):
    """A known path called with the wrong HTTP method (405)."""

    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(ProxyError):
    """The request body is over --max-body-size (413)."""

    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(ProxyError):
    """The key is over one of its limits (429)."""

    status = 429
    error_type = "requests"
    code = "rate_limit_exceeded"


class UpstreamError(ProxyError):
    """llama.cpp failed in a way that is not the client's fault (502)."""

    status = 502
    error_type = "api_error"
    code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    """llama.cpp cannot be reached at all (502)."""

    code = "upstream_unavailable"


class UpstreamLoading(UpstreamError):
    """llama.cpp answered 503: it is still loading the model (503, retry later)."""

    status = 503
    code = "upstream_loading"


class UpstreamTimeout(UpstreamError):
    """llama.cpp did not connect, answer or produce the next token in time (504)."""

    status = 504
    code = "upstream_timeout"


class ServiceShuttingDown(ProxyError):
    """The proxy is draining for shutdown and takes no new requests (503)."""

    status = 503
    error_type = "server_error"
    code = "shutting_down"


class ChatTemplateRejected(InvalidRequest):
    """The template refused the conversation (its raise_exception, or a sandbox violation)."""

    code = "invalid_chat_template_input"


class ServerMisconfigured(ProxyError):
    """The operator's setup cannot serve this request (500, says what to fix)."""

    status = 500
    error_type = "server_error"
    code = "server_misconfigured"


class RateLimiterUnavailable(ProxyError):
    """Redis cannot be reached and the operator chose to fail closed (503)."""

    status = 503
    error_type = "server_error"
    code = "rate_limiter_unavailable"


class ConcurrencyLimited(RateLimited):
    """Every concurrent slot of the key is busy."""

    code = "concurrency_limit_exceeded"


class TooManyAuthFailures(RateLimited):
    """This address failed authentication too often (429)."""

    code = "too_many_authentication_failures"
    error_type = "invalid_request_error"


class ServerOverloaded(ProxyError):
    """Every server of the model's pool is busy and the gateway's wait queue is full, or the
    wait timed out (503 with Retry-After)."""

    status = 503
    error_type = "server_error"
    code = "server_overloaded"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class NoServerAvailable(ProxyError):
    """No server of the model's pool is ready or loading: all are down or draining (503)."""

    status = 503
    error_type = "server_error"
    code = "upstream_unavailable"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class BudgetExceeded(RateLimited):
    """The key has used its token budget for the day or month (429 until it resets)."""

    code = "budget_exceeded"
    error_type = "tokens"
