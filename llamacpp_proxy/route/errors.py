"""The client-visible errors of the route stage.

They subclass errors.py's hierarchy so one `write_error` renders them; at integration they
move into errors.py itself, which is meant to list every ProxyError subclass.
"""

from __future__ import annotations

from ..errors import NotFound, ProxyError


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


class ServerOverloaded(ProxyError):
    """Every server of the pool is busy and the wait queue is full, or the wait timed out."""

    status = 503
    error_type = "server_error"
    code = "server_overloaded"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class NoServerAvailable(ProxyError):
    """No server of the pool is ready or loading: all are down or draining (503)."""

    status = 503
    error_type = "server_error"
    code = "upstream_unavailable"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
