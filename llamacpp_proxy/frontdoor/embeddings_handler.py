"""POST /v1/embeddings: OpenAI's embeddings API on the gateway's pipeline.

The edges are `embeddings.py`'s (parse, encode); the rest is CompletionsHandler's: the body
read and its bound, the key check, the limits (a request, and its input tokens: estimated
at admission, settled with llama.cpp's count), the fair queue for a slot of the model's
pool, failover before llama.cpp began, cancellation when the client leaves, the ledger row
and the metrics. One request is one llama.cpp /v1/embeddings call, for all its inputs.
"""

from __future__ import annotations

from ..errors import InvalidRequest, ProxyError, UpstreamUnavailable
from ..guard.ratelimit import Cost
from ..route.pools import check_kind
from ..upstream.llamacpp import EmbeddingsResult
from .completions import CompletionsHandler, Generation
from .embeddings import (
    dimensions_refused,
    embeddings_response,
    estimate_tokens,
    parse_embeddings_request,
)
from .openai_request import parse_json_body
from .openai_response import Choice


class EmbeddingsHandler(CompletionsHandler):
    """POST /v1/embeddings."""

    endpoint = "/v1/embeddings"
    records_usage = True

    def initialize(self, ctx: object) -> None:
        super().initialize(ctx)
        self._estimate = 0

    async def post(self) -> None:
        if self._early_error is not None:
            raise self._early_error
        body = parse_json_body(b"".join(self._body_parts))
        self._body_parts = []
        request = parse_embeddings_request(body)
        principal = self.principal
        assert principal is not None  # embeddings require a key
        # Before admission: a model the key cannot use, or of the wrong kind, costs nothing.
        self.usage_model = request.model
        self._pool = self.ctx.routes.lookup(request.model, principal.models)
        check_kind(self._pool.pool, "embedding", request.model)
        self.model = self._pool.pool.name
        self._estimate = estimate_tokens(request.inputs)
        budgets = self.ctx.budgets
        if budgets is not None and principal.budget is not None:
            # 429 budget_exceeded, or the estimate held until the request ends (release()).
            self.budget_hold = await budgets.reserve(principal, self._estimate)
        self.admission = await self.ctx.limiter.admit(principal, Cost(1, self._estimate))
        self.set_default_headers()
        model = request.model or await self._served_model()
        self.usage_model = model
        if self._client_gone:
            return
        # No prompt for the router: an embedding reuses no prompt cache, so no affinity.
        generation = Generation(Choice(index=0), "", {"input": request.inputs}, True)
        self._generations = [generation]
        [result] = await self._gather(self._embed)
        size = len(result.vectors[0]) if result.vectors else 0
        if request.dimensions is not None and request.dimensions != size:
            # Known only from the answer: llama.cpp says nothing of the size beforehand.
            raise dimensions_refused(request.dimensions, size)
        self.set_status(200)
        self.finish(
            embeddings_response(model, result.vectors, request.encoding_format, self.prompt_tokens)
        )

    async def _embed(self, generation: Generation) -> EmbeddingsResult:
        call, client = generation.call, generation.client
        assert call is not None and client is not None
        try:
            result = await client.embeddings(generation.body["input"], call)
        except ProxyError as exc:
            if isinstance(exc, InvalidRequest | UpstreamUnavailable):
                # Refused by llama.cpp, or never reached: it computed nothing.
                generation.charged = True
            raise  # else (a broken answer, a timeout) _charge_unfinished charges the estimate
        generation.charged = True
        self.prompt_tokens += result.prompt_tokens
        return result

    def _charge_unfinished(self) -> None:
        """A call that began and did not end with llama.cpp's count (client gone, timeout,
        a broken answer) is charged its estimate: as much as llama.cpp may have done."""
        for generation in self._generations:
            if generation.charged or generation.call is None:
                continue
            generation.charged = True
            self.prompt_tokens += self._estimate
