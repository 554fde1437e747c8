"""The Tornado application: the URL table and its settings."""

from __future__ import annotations

import tornado.web

from .context import AppContext
from .frontdoor.admin import MetricsHandler, StatusHandler
from .frontdoor.completions import ChatCompletionsHandler, TextCompletionsHandler
from .frontdoor.embeddings_handler import EmbeddingsHandler
from .frontdoor.handlers import (
    HealthHandler,
    ModelsHandler,
    NotFoundHandler,
    OpenAPIHandler,
    ReadyHandler,
    make_log_function,
)
from .frontdoor.messages import CountTokensHandler, MessagesHandler
from .frontdoor.responses_handler import ResponsesHandler


def make_app(ctx: AppContext) -> tornado.web.Application:
    """The proxy's application, every handler sharing `ctx`."""
    args = {"ctx": ctx}
    return tornado.web.Application(
        [
            (r"/v1/chat/completions", ChatCompletionsHandler, args),
            (r"/v1/completions", TextCompletionsHandler, args),
            (r"/v1/embeddings", EmbeddingsHandler, args),
            (r"/v1/messages", MessagesHandler, args),
            (r"/v1/messages/count_tokens", CountTokensHandler, args),
            (r"/v1/responses", ResponsesHandler, args),
            (r"/v1/models", ModelsHandler, args),
            (r"/v1/models/(.+)", ModelsHandler, args),
            (r"/health", HealthHandler, args),
            (r"/health/ready", ReadyHandler, args),
            (r"/openapi.json", OpenAPIHandler, args),
            (r"/metrics", MetricsHandler, args),
            (r"/status", StatusHandler, args),
            # Clients configured with a base URL without /v1 still work.
            (r"/chat/completions", ChatCompletionsHandler, args),
            (r"/completions", TextCompletionsHandler, args),
            (r"/embeddings", EmbeddingsHandler, args),
            (r"/models", ModelsHandler, args),
            (r"/responses", ResponsesHandler, args),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=args,
        log_function=make_log_function(ctx),
        compress_response=False,
        xheaders=False,
    )
