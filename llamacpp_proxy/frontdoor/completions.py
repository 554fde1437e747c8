"""POST /v1/chat/completions and /v1/completions: validate, admit, render, call llama.cpp,
answer, charge.

A request becomes one llama.cpp generation per choice (n per prompt). It is admitted once its
body is parsed, for what it may cost (its generations, and prompt + max_tokens tokens for
each); its generations then run a few at a time (the key's slots it was granted, at most
--max-parallel-generations), so no request holds more than that share of the upstream.
Non-streamed, their results are gathered; streamed, each one's events are written as OpenAI
chunks the moment a read brings them, with one flush per read. Every generation is charged
when it ends, whatever ends it (the rule is in `_charge_unfinished`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

import tornado.web
from tornado.iostream import IOStream, StreamClosedError

from ..errors import (
    InvalidRequest,
    NoServerAvailable,
    PayloadTooLarge,
    ProxyError,
    UpstreamUnavailable,
)
from ..guard.ratelimit import Cost
from ..model_names import model_display_name
from ..render.constraints import Constraint, merge_constraints
from ..render.control_tokens import mark_messages
from ..render.tool_calls import ToolCallFilter, parse_tool_calls
from ..render.tools_describe import (
    DESCRIBED_HEADER,
    DescribedCallFilter,
    describe_tools,
    described_conversation,
)
from ..render.tools_policy import DROPPED_HEADER, plain_tool_history
from ..request import CompletionRequest
from ..route.outliers import RequestResults
from ..route.pools import check_kind
from ..route.router import Lease, Router
from ..upstream.llamacpp import ClientGone, ClientStalled, LlamaCppClient, UpstreamCall
from ..upstream.sse import DONE
from ..upstreams import PoolRuntime, counts_against_server, failure_verdict
from .chunk_writer import direct_stream
from .handlers import BaseHandler, log
from .openai_request import (
    apply_max_tokens_limit,
    parse_chat_request,
    parse_json_body,
    parse_text_request,
)
from .openai_response import (
    Choice,
    ChunkEncoder,
    Usage,
    chat_logprobs,
    chat_response,
    error_event,
    finish_reason,
    new_id,
    text_logprobs,
    text_response,
)
from .prompt_bounds import body_size, check_prompt_size, render_off_loop_if_large

QUEUED_COMMENT = b": queued\n\n"
"""What a streamed request waiting in the queue sends every --queue-keepalive seconds: an
SSE comment, which every SSE client (the OpenAI and Anthropic SDKs included) skips."""


def _echo_logprobs_refused() -> InvalidRequest:
    """echo with logprobs asks for the prompt tokens' logprobs, which llama.cpp's server
    does not return: an answer with the generated tokens' only would look complete and
    silently score every prompt token as missing (lm-evaluation-harness then reports chance
    accuracy as a result), so it is refused."""
    return InvalidRequest(
        "'echo' with 'logprobs' needs the logprobs of the prompt tokens, which llama.cpp's "
        "server does not return (only those of generated tokens). Send 'echo' or "
        "'logprobs', not both.",
        param="logprobs",
        code="unsupported_parameter",
    )


def _active_tools(request: CompletionRequest) -> list[dict[str, Any]] | None:
    """The tools the model is offered (none when tool_choice is "none")."""
    if not request.chat or not request.tools or request.tool_choice == "none":
        return None
    return request.tools


_ASKING = ("user", "tool")


def _ignore_closed(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a closed client is handled by on_connection_close


async def _settled(future: Awaitable[None]) -> None:
    """Wait for a flush; a client that left is handled elsewhere (on_connection_close)."""
    with contextlib.suppress(StreamClosedError):
        await future


def estimate_tokens(data_bytes: int) -> int:
    """Tokens a text of this many UTF-8 bytes is taken to hold, before llama.cpp counts:
    bytes / 4, rounded up (English BPE averages about 4 bytes a token)."""
    return math.ceil(data_bytes / 4)


class Generation:
    """One choice: its prompt, its llama.cpp body and call, and what it produced so far."""

    __slots__ = (
        "body",
        "call",
        "charged",
        "choice",
        "client",
        "counts_prompt",
        "last_event",
        "opened",
        "prompt",
        "text_offset",
        "tool_filter",
    )

    def __init__(
        self,
        choice: Choice,
        prompt: str,
        body: dict[str, Any],
        counts_prompt: bool,
    ) -> None:
        self.choice = choice
        self.prompt = prompt
        self.body = body
        # Made when the generation starts: one waiting for its turn has no timer running.
        self.call: UpstreamCall | None = None
        self.client: LlamaCppClient | None = None  # the leased server's
        self.opened = False  # llama.cpp answered 200: it began, never re-sent
        self.counts_prompt = counts_prompt  # n choices of one prompt count its tokens once
        self.text_offset = 0
        self.tool_filter: ToolCallFilter | None = None
        self.last_event: dict[str, Any] | None = None  # its counts if the stream breaks
        self.charged = False  # charged, or known to have cost nothing


@tornado.web.stream_request_body
class CompletionsHandler(BaseHandler):
    """Shared flow of both completion endpoints; subclasses say chat or text."""

    chat = True
    # Admitted in post() (`_admit`), not in prepare(): what a request costs (generations,
    # tokens) is known only from its body. A body that fails validation costs nothing.
    rate_limited = False

    # Per-request state: class-level starting values (immutable) as in BaseHandler; the
    # containers are made per request in initialize.
    _body_size = 0
    _max_tokens = 0
    _stopped = False  # a generation failed: start no more
    _shutdown: ProxyError | None = None  # the shutdown timeout ended it (end_for_shutdown)
    _client_gone = False
    _streaming = False
    _tools: list[dict[str, Any]] | None = None
    stream_error: str | None = None
    _forced_tools = False
    _parallel_tools = True  # False: at most one tool call per answer
    _described = False  # tools policy "describe": calls are parsed from text
    _early_error: ProxyError | None = None
    _pool: PoolRuntime | None = None
    _session: str | None = None
    _request_results: RequestResults | None = None
    constraint_names: ClassVar[Mapping[str, str]] = {}
    """This protocol's names for where an output constraint came from, where they are not
    OpenAI chat's (render/constraints.py)."""
    keepalive_while_queued = False
    """Streamed: a wait in the queue commits to 200 + SSE after --queue-keepalive
    seconds and sends comments (set by the front door once the body says stream)."""
    _keepalive: asyncio.TimerHandle | None = None
    # Once the head is out: where a stream's chunks go past Tornado's write path
    # (chunk_writer.py); None while not asked yet or when the public path must serve.
    _direct: IOStream | None = None
    _direct_socket: socket.socket | None = None
    _direct_asked = False
    _roles_written = False  # chat, streamed: every choice's role chunk is out
    prefills_assistant = False
    """A last assistant message (text, no tool calls) is the start of the answer, which
    the model continues (Anthropic's prefill), not a finished turn; set by the front door
    whose protocol says so."""

    def initialize(self, ctx: Any) -> None:
        super().initialize(ctx)
        self._body_parts: list[bytes] = []
        self._generations: list[Generation] = []
        self._waits: set[asyncio.Future[Lease]] = set()

    async def prepare(self) -> None:
        # The body is streamed, so prepare() runs before it is read. An error sent now would
        # make Tornado close the connection once the answer is written, without saying
        # `Connection: close`: a kept-alive client then sends its next request into a closed
        # (or reset) socket. So a refusal (401, 429, 503 from the limiter) waits until the
        # body is in, read and discarded (bounded by --max-body-size and the body timeout),
        # and the connection stays usable. Errors that close anyway say so and go at once.
        try:
            await super().prepare()
        except ProxyError as error:
            if error.headers.get("Connection") == "close":
                raise
            self._early_error = error

    def check_request(self) -> None:
        limit = self.ctx.settings.max_body_size
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(
                f"The request body is {length} bytes; the limit is {limit}.",
                headers={"Connection": "close"},
            )
        # A chunked body over the limit makes Tornado drop the connection. (The body
        # timeout is the HTTPServer's, --client-body-timeout.)
        self.request.connection.set_max_body_size(limit)  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        if self._early_error is None:
            self._body_parts.append(chunk)
            self._body_size += len(chunk)

    async def post(self) -> None:
        if self._early_error is not None:
            raise self._early_error
        body = parse_json_body(b"".join(self._body_parts))
        self._body_parts = []
        request = self.parse_request(body)
        self.keepalive_while_queued = request.stream
        self._tools = _active_tools(request)
        self._parallel_tools = request.parallel_tool_calls
        constraint = self._merge_constraints(request)
        assert self.principal is not None  # completions require a key
        # Before admission: a model the key cannot use costs it nothing.
        self.usage_model = request.model
        self._pool = self.ctx.routes.lookup(request.model, self.principal.models)
        check_kind(self._pool.pool, "chat", request.model)
        self.model = self._pool.pool.name
        self._session = self._session_key(request, body)
        await self._admit(request)
        if constraint.found:  # after admission: the key's limits bound its checking
            await self.ctx.constraint_checks.check(constraint, self.principal.name)
        prompts = await self._prompts(request)
        model = request.model or await self._served_model()
        self.usage_model = model
        if self._client_gone:
            return  # left while /props was fetched: start nothing on llama.cpp
        self._generations = self._plan(request, prompts)
        await self.respond(request, model)

    def _merge_constraints(self, request: CompletionRequest) -> Constraint:
        """The request's output constraints merged into one (a 400 for two), still to be
        checked (ctx.constraint_checks: off the event loop when large)."""
        constraint = merge_constraints(request, self._tools, self.constraint_names)
        self._forced_tools = constraint.forced
        return constraint

    def parse_request(self, body: dict[str, Any]) -> CompletionRequest:
        """The validated request (another front door parses its own protocol here)."""
        request = parse_chat_request(body) if self.chat else parse_text_request(body)
        if request.echo and request.logprobs is not None:
            raise _echo_logprobs_refused()
        return request

    async def respond(self, request: CompletionRequest, model: str) -> None:
        """Run the planned generations and answer (another front door encodes its own)."""
        response_id, created = new_id(self.chat), int(time.time())
        if request.stream:
            await self._stream(request, ChunkEncoder(self.chat, response_id, created, model))
        else:
            await self._complete(request, response_id, created, model)

    def _session_key(self, request: CompletionRequest, body: Any) -> str | None:
        """What the client says names the conversation (for affinity; the prompt alone
        usually suffices): X-Session-Id, else prompt_cache_key, else user."""
        header = self.request.headers.get("X-Session-Id")
        if header:
            return header
        key = body.get("prompt_cache_key") if isinstance(body, dict) else None
        if isinstance(key, str) and key:
            return key
        return request.user or None

    async def _prompts(self, request: CompletionRequest) -> list[str]:
        if not self.chat:
            return request.prompts
        pool = self._pool
        assert pool is not None
        upstream = pool.meta_client()
        props = await upstream.props()
        template = pool.template or pool.model_template(props)
        messages = request.messages
        if request.tools and not template.uses_tools:
            messages = self._apply_tools_policy(request, template.origin, pool)
        adds_bos = await upstream.adds_bos()
        tools = None if self._described else self._tools
        marked = (
            None
            if self.ctx.settings.allow_content_control_tokens
            else mark_messages(messages, tools)
        )
        if marked is not None:
            messages = marked.messages
            tools = tools if marked.tools is None else marked.tools
        prefill = ""
        # Only after a user's turn (or tool results) is it the start of an answer to them.
        if self.prefills_assistant and len(messages) > 1 and messages[-2]["role"] in _ASKING:
            last = messages[-1]
            if last["role"] == "assistant" and last.get("content") and not last.get("tool_calls"):
                # As llama-server does: the turns before it with the generation prompt,
                # then its text, unclosed. Rendered as a turn, the template would close it
                # and open a new one, and the model would start over instead of going on.
                prefill = last["content"]
                messages = messages[:-1]
        prompt = await render_off_loop_if_large(
            body_size(self.request.headers.get("Content-Length")),
            template.render,
            messages,
            bos_token=str(props.get("bos_token") or ""),
            eos_token=str(props.get("eos_token") or ""),
            tools=tools,
            llama_adds_bos=adds_bos,
        )
        if prefill:
            prompt += prefill  # a marker, when it looks like a control token: assembled below
        check_prompt_size(prompt, self.ctx.settings.max_body_size)
        if marked is not None:
            # Slow path: some content looks like a control token; it goes as its plain-text
            # token ids (each distinct text tokenized once, and cached).
            texts = marked.texts()
            tokens = await asyncio.gather(*(upstream.plain_tokens(t) for t in texts))
            prompt = marked.assemble(prompt, dict(zip(texts, tokens, strict=True)), adds_bos)
        return [prompt]

    def _apply_tools_policy(
        self, request: CompletionRequest, origin: str, pool: PoolRuntime
    ) -> list[dict[str, Any]]:
        """The model's template cannot express tools: the messages to render, by the
        model's tools policy (render/tools_policy.py): refuse (400), drop them (saying so in
        a header; a forced call cannot be dropped), or describe them in the system prompt
        and parse calls back from the text."""
        policy = pool.pool.tools_policy or self.ctx.settings.tools_policy
        messages = request.messages
        if self._tools is None:  # tool_choice "none": nothing offered, only the history
            if policy == "describe":
                return described_conversation(messages, None)
            return plain_tool_history(messages) if policy == "drop" else messages
        if policy == "describe":
            self._described = True
            self.set_header(DESCRIBED_HEADER, str(len(self._tools)))
            description = describe_tools(self._tools, request.tool_choice, self._parallel_tools)
            return described_conversation(messages, description)
        if policy != "drop" or self._forced_tools:
            forced = " and tool_choice forces a call" if self._forced_tools else ""
            raise InvalidRequest(
                f"The chat template {origin} cannot express tools{forced}; use a template "
                "that does (llama3, qwen2.5) or send the request without 'tools' (or set "
                "this model's tools_policy to 'describe', or 'drop').",
                param="tools",
                code="tools_not_supported",
            )
        self.set_header(DROPPED_HEADER, str(len(self._tools)))
        self._tools = None
        return plain_tool_history(messages)

    async def _served_model(self) -> str:
        assert self._pool is not None
        if self.ctx.routes.from_file:
            return self._pool.pool.name
        props = await self._pool.meta_client().props()
        return model_display_name(props, self.ctx.settings)

    async def _admit(self, request: CompletionRequest) -> None:
        """Admit the request for what it may cost, or raise RateLimited (429).

        The estimate is OpenAI's: prompt tokens (the body's bytes / 4: messages, tools and
        every prompt, JSON punctuation included, so it errs high) + max_tokens for each
        generation. finish() settles it with llama.cpp's real counts.
        """
        apply_max_tokens_limit(request, self.ctx.settings.max_tokens_limit)
        self._max_tokens = request.max_tokens or 0
        generations = (1 if self.chat else len(request.prompts)) * request.n
        # Each of n choices has llama.cpp evaluate its prompt (the body holds every prompt).
        estimate = estimate_tokens(self._body_size) * request.n + self._max_tokens * generations
        assert self.principal is not None
        budgets = self.ctx.budgets
        if budgets is not None and self.principal.budget is not None:
            # 429 budget_exceeded, or the estimate held until the request ends (release()).
            self.budget_hold = await budgets.reserve(self.principal, estimate)
        self.admission = await self.ctx.limiter.admit(self.principal, Cost(generations, estimate))
        self.set_default_headers()

    def _plan(self, request: CompletionRequest, prompts: list[str]) -> list[Generation]:
        assert self._pool is not None
        upstream = self._pool.meta_client()  # the body is the same for every server
        generations = []
        for p, prompt in enumerate(prompts):
            for j in range(request.n):
                index = p * request.n + j
                choice = Choice(index=index, prompt_text=prompt if request.echo else "")
                body = upstream.completion_body(request, prompt, j)
                generation = Generation(choice, prompt, body, j == 0)
                if self._tools:
                    kind = DescribedCallFilter if self._described else ToolCallFilter
                    generation.tool_filter = kind(
                        self._tools, self._forced_tools, self._parallel_tools
                    )
                generations.append(generation)
        return generations

    def _charge(self, generation: Generation, result: dict[str, Any]) -> None:
        generation.charged = True
        if generation.counts_prompt:
            self.prompt_tokens += int(result.get("tokens_evaluated") or 0)
            timings = result.get("timings")
            if isinstance(timings, dict):  # only the final event has them (cache_n)
                # Not checked per event (event_problem runs per token): a count that is no
                # count, from a broken llama.cpp, counts nothing rather than failing the
                # answer.
                cached = timings.get("cache_n")
                if type(cached) is int and cached > 0:
                    self.cached_tokens += cached
        else:
            # Another choice of a prompt already counted: the answer's usage counts a prompt
            # once (OpenAI's rule), but llama.cpp evaluated it again, save what its slot
            # had cached, and the key's limits count that work.
            evaluated = int(result.get("tokens_evaluated") or 0)
            timings = result.get("timings")
            cached = timings.get("cache_n") if isinstance(timings, dict) else None
            if type(cached) is int and cached > 0:
                evaluated -= cached
            self.unreported_tokens += max(0, evaluated)
        self.completion_tokens += int(result.get("tokens_predicted") or 0)

    def _charge_unfinished(self) -> None:
        """Charge the generations that started and did not finish, whatever ended them.

        What is knowable: a stream's last event carries llama.cpp's counts so far. A
        non-streamed answer arrives only at the end, so one cut short (client gone, a sibling
        failed, timeout) is charged its estimate: its prompt (bytes / 4) + max_tokens, as
        much as llama.cpp may have done. A stream cut before its first token is charged its
        prompt. Generations that never started cost nothing; one llama.cpp answered with an
        error status, or never accepted, is marked charged (nothing) where it failed.
        """
        for generation in self._generations:
            if generation.charged or generation.call is None:
                continue
            if generation.last_event is not None:
                self._charge(generation, generation.last_event)
                continue
            generation.charged = True
            prompt = estimate_tokens(len(generation.prompt.encode()))
            if generation.counts_prompt:
                self.prompt_tokens += prompt
            else:
                self.unreported_tokens += prompt  # evaluated again for this choice
            if not generation.body.get("stream"):
                self.completion_tokens += self._max_tokens

    def _usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens)

    # -- non-streamed ---------------------------------------------------------------------

    async def _complete(
        self, request: CompletionRequest, response_id: str, created: int, model: str
    ) -> None:
        results = await self._gather(self._complete_one)
        for generation, result in zip(self._generations, results, strict=True):
            choice = generation.choice
            choice.text = str(result.get("content") or "")
            choice.finish_reason = finish_reason(result.get("stop_type"))
            if self._tools:
                parsed = parse_tool_calls(choice.text, self._tools, self._parallel_tools)
                if parsed is not None:
                    content, choice.tool_calls = parsed
                    choice.text = content or ""
                    choice.finish_reason = "tool_calls"
            if request.logprobs is not None:
                entries = result.get("completion_probabilities") or []
                choice.logprobs = (
                    chat_logprobs(entries, request.logprobs)
                    if self.chat
                    else text_logprobs(entries, request.logprobs, len(choice.prompt_text))
                )
        choices = [g.choice for g in self._generations]
        build = chat_response if self.chat else text_response
        self.write_json(build(response_id, created, model, choices, self._usage()))

    async def _complete_one(self, generation: Generation) -> dict[str, Any]:
        call = generation.call
        assert call is not None
        try:
            assert generation.client is not None
            result = await generation.client.complete(generation.body, call)
        except ProxyError as exc:
            if call.got_first_byte or isinstance(exc, UpstreamUnavailable):
                generation.charged = True  # llama.cpp refused it with an error, or was not reached
            raise
        self._charge(generation, result)  # now: a later sibling's failure must not lose it
        return result

    def _width(self) -> int:
        """Generations of this request that run at once."""
        admission = self.admission
        slots = admission.slots if admission is not None else len(self._generations)
        return max(1, min(slots, self.ctx.settings.max_parallel_generations))

    async def _start(
        self, generation: Generation, run: Callable[[Generation], Awaitable[Any]]
    ) -> Any:
        """Run one generation on a server of the pool, holding a lease on its slot until it
        ends, whatever ends it. Failed before llama.cpp could have begun it (connection
        refused, 503 loading), it runs again on another server of the pool, if one is up,
        within what is left of the one --queue-timeout it started with."""
        pool = self._pool
        assert pool is not None
        router = pool.router
        tried: frozenset[str] = frozenset()
        deadline = router.queue_deadline()
        while True:
            if self._client_gone or self._stopped:
                raise self._shutdown or ClientGone()
            lease = await self._lease(router, generation, tried, deadline)
            key = lease.server.key
            self.usage_server = lease.server.display
            try:
                if self._client_gone or self._stopped:
                    raise self._shutdown or ClientGone()
                generation.client = client = pool.client_for(key)
                generation.call = call = client.new_call()
                try:
                    result = await run(generation)
                except ProxyError as exc:
                    if exc is self._shutdown:
                        raise  # our own abort: says nothing about the server
                    if counts_against_server(exc):
                        lease.report(False, exc.message, self._results())
                    verdict = failure_verdict(exc, call, generation.opened)
                    if verdict.health is not None:
                        lease.observe(verdict.health)
                    if verdict.recheck:
                        self.ctx.routes.recheck(lease)
                    tried |= {key}
                    if (
                        not verdict.retry_elsewhere
                        or self._client_gone
                        or self._stopped
                        or not router.can_retry(tried)
                    ):
                        raise
                    log.warning(
                        "request %s: %s failed before llama.cpp began (%s); trying another server",
                        self.request_id,
                        lease.server.display,
                        exc.message,
                    )
                    call.done()
                    generation.call = None  # nothing to charge: it never started
                    generation.charged = False
                else:
                    lease.report(True, results=self._results())
                    return result
            finally:
                lease.release()
                if generation.call is not None:
                    generation.call.done()  # whatever ended it: out of the client's live calls

    def _results(self) -> RequestResults | None:
        """What this request's generations reported to the servers: with several, the
        request counts once per server toward ejection (route/outliers.py)."""
        if self._request_results is None and len(self._generations) > 1:
            self._request_results = RequestResults()
        return self._request_results

    async def _lease(
        self, router: Router, generation: Generation, tried: frozenset[str], deadline: float
    ) -> Lease:
        """A slot for the generation: at once when one is free (no task), else a wait in
        the pool's queue, until `deadline` (the router's clock), that the client leaving
        cancels."""
        principal = self.principal
        assert principal is not None
        # Fair between keys, in proportion to their weight (route/waitqueue.py).
        key, weight = principal.name, principal.weight
        try:
            lease = router.acquire_nowait(generation.prompt, self._session, tried, key, weight)
        except NoServerAvailable:
            assert self._pool is not None
            if not await self.ctx.routes.probe_down_now(self._pool):
                raise
            lease = router.acquire_nowait(generation.prompt, self._session, tried, key, weight)
        if lease is not None:
            return lease
        wait = asyncio.ensure_future(
            router.acquire(
                generation.prompt,
                self._session,
                deadline,
                tried,
                queue_key=key,
                queue_weight=weight,
            )
        )
        self._waits.add(wait)
        if self.keepalive_while_queued and self._keepalive is None:
            self._arm_keepalive()
        waited_from = time.monotonic()
        try:
            return await wait
        except asyncio.CancelledError:
            if self._client_gone and wait.cancelled():
                raise ClientGone() from None
            if self._shutdown is not None and wait.cancelled():
                raise self._shutdown from None
            raise
        finally:
            self._waits.discard(wait)
            if not self._waits and self._keepalive is not None:
                self._keepalive.cancel()
                self._keepalive = None
            if self.ctx.metrics is not None:
                self.ctx.metrics.queue_waited(self.model, time.monotonic() - waited_from)

    def _arm_keepalive(self) -> None:
        """One timer for this request while it waits (none for one admitted at once)."""
        every = self.ctx.settings.queue_keepalive
        if every > 0:
            loop = asyncio.get_running_loop()
            self._keepalive = loop.call_later(every, self._queued_keepalive, every)

    def _queued_keepalive(self, every: float) -> None:
        """Still queued after --queue-keepalive seconds: the answer commits to 200 + SSE (a
        refusal from now on is the stream's error event, not a 503/429 status) and a
        comment goes out now and every `every` seconds, so the client, and any proxy between,
        sees a live connection. Before that a refusal is a plain status an SDK retries."""
        if self._client_gone or not self._waits:
            self._keepalive = None
            return
        self._start_stream()
        self._write(QUEUED_COMMENT)
        self._keepalive = asyncio.get_running_loop().call_later(
            every, self._queued_keepalive, every
        )

    async def _gather(self, run: Callable[[Generation], Awaitable[Any]]) -> list[Any]:
        """Run every generation, `_width()` at a time; the first failure aborts the rest."""
        generations = self._generations
        if len(generations) == 1:
            try:
                result = await self._start(generations[0], run)
            except BaseException:
                self._charge_unfinished()
                raise
            if self.budget_hold is not None:
                await self.settle_budget()  # before the answer ends
            return [result]
        results: list[Any] = [None] * len(generations)
        turns = iter(range(len(generations)))  # shared: each generation is taken once

        async def worker() -> None:
            for i in turns:
                results[i] = await self._start(generations[i], run)

        workers = [asyncio.ensure_future(worker()) for _ in range(self._width())]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            self._stopped = True
            for generation in generations:
                if generation.call is not None:
                    generation.call.abort(ClientGone())
            await asyncio.gather(*workers, return_exceptions=True)
            self._charge_unfinished()
            # Each task keeps the error it ended with, whose traceback holds this frame,
            # which holds the tasks: a cycle per request that only the cyclic collector frees.
            workers.clear()
            raise
        if self.budget_hold is not None:
            await self.settle_budget()
        return results

    # -- streamed -------------------------------------------------------------------------

    async def _stream(self, request: CompletionRequest, encoder: ChunkEncoder) -> None:
        def epilogue() -> None:
            if request.include_usage:
                self.write(encoder.usage(self._usage()))
            self.write(DONE)

        await self._stream_events(
            lambda g: self._stream_one(request, encoder, g), error_event, epilogue
        )

    async def _stream_events(
        self,
        relay: Callable[[Generation], Awaitable[None]],
        error_event: Callable[[ProxyError], bytes],
        epilogue: Callable[[], None] | None = None,
    ) -> None:
        """Run the relay of every generation, then end the stream: a failure before
        anything was sent is a plain error response (its status); after, `error_event(error)`
        (the protocol's final error event) ends it; a client that left gets nothing more.
        `epilogue` writes what follows a stream that ended well ([DONE], usage)."""
        try:
            await self._gather(relay)
        except ProxyError as error:
            if not self._streaming:
                raise  # nothing sent yet: a plain error response with its status
            self._fail_started_stream(error, error_event(error))
            return
        except ClientStalled as stalled:
            # Its socket is full: an error event would never reach it. Closing says the
            # stream broke (no final chunk), as nginx's send_timeout does.
            log.warning("request %s: %s; closing its connection", self.request_id, stalled)
            self.stream_error = "client_stalled"  # the access log: not a whole answer
            self.request.connection.stream.close()  # type: ignore[union-attr]
            # Tornado would not call it: finish() clears the close callback before the
            # closed stream's callback runs. Recorded as a client that left (499).
            self.on_connection_close()
            return
        except ClientGone:
            return
        if epilogue is not None:
            epilogue()
        self.finish()

    def _fail_started_stream(self, error: ProxyError, event: bytes) -> None:
        """A failure after the stream began can no longer change the status: it is one final
        error event (in the front door's shape), then the stream ends."""
        self.stream_error = error.code
        self.error = error  # the ledger, metrics and access log count a failed request
        self._charge_unfinished()
        log.warning(
            "request %s: stream ended by an error after it started: %s %s",
            self.request_id,
            error.status,
            error.message,
        )
        self._write(event)
        self.finish()

    def _start_stream(self) -> None:
        if self._streaming:
            return
        self._streaming = True
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")

    def _write(self, data: bytes) -> None:
        """Send `data` now, in order with every other write of this response (no wait)."""
        if not self._client_gone:
            self._push(data)

    def _send(self, data: bytes) -> Awaitable[None] | None:
        """Send one read's bytes; hand back a wait only while the client has not taken
        every byte yet.

        Whether bytes are left is asked of the IOStream (`writing()`), not of a flush
        future: waiting whenever that future was pending paused the upstream read, made a
        task and resumed the read for most events at one event per read, even for clients
        that keep up (measured: 60-71 -> 42-49 µs of proxy CPU per event, the kernel's share
        30-34% -> 21-24%; docs/benchmarks.md, "What changed, step by step"). What is left
        is waited for with a future of IOStream.write, which resolves once every byte queued
        before it is sent. The connection's flush future cannot serve there: its next
        write replaces it, so when another choice of the same request (n > 1) writes
        first, it is never resolved and this choice's upstream stays paused."""
        drained = self._push(data)
        return None if drained is None else _settled(drained)

    def _push(self, data: bytes) -> asyncio.Future[None] | None:
        """Write `data` as one chunk; the IOStream's future while bytes are still unsent.

        Once the head is out (sent by Tornado's public path, with its status, headers and
        Transfer-Encoding), the chunk goes straight to the client's IOStream: one
        `socket.send` when the IOStream holds nothing unsent, and only what the socket did
        not take is queued with IOStream.write. No RequestHandler.flush,
        HTTP1Connection.write or future per event: their three futures and callbacks per
        read were 15% of the proxy's CPU at a GPU's pace (docs/benchmarks.md). Order holds:
        every write of the response, this path's or Tornado's (the head, [DONE], the
        terminating chunk of finish()), ends in the same IOStream's queue, and the socket
        is written directly only while that queue is empty. Where this cannot be done alike
        (chunk_writer.py), or bytes wait in the handler's own buffer, Tornado's public path
        serves."""
        stream = self._direct
        if stream is None or self._write_buffer or self._finished:
            return self._push_public(data)
        if stream.closed():
            return None  # the client left: on_connection_close handles it
        if data:
            frame = b"%x\r\n%b\r\n" % (len(data), data)
            sock = self._direct_socket
            if sock is not None and not stream.writing():
                try:
                    sent = sock.send(frame)
                except OSError:
                    # Would block, or the client is gone: IOStream.write below meets the
                    # same, and queues the frame or closes the stream the way Tornado does.
                    sent = 0
                if sent == len(frame):
                    return None
                if sent:
                    frame = frame[sent:]
        elif stream.writing():
            frame = b""  # nothing new: a wait for what is still queued
        else:
            return None
        try:
            drained = stream.write(frame)
        except StreamClosedError:
            return None
        return None if drained.done() else drained  # done: sent, or failed (retrieved)

    def _push_public(self, data: bytes) -> asyncio.Future[None] | None:
        """Tornado's public path: write, flush (the head, the first time), and the wait for
        what the client has not taken yet. Once the head is out, asks (once) whether the
        chunks that follow may bypass it."""
        if data:
            self.write(data)
        flushed = self.flush()
        if flushed.done():
            flushed.exception()  # a closed client is handled by on_connection_close
        else:
            flushed.add_done_callback(_ignore_closed)
        if not self._direct_asked and self._headers_written:
            self._direct_asked = True
            found = direct_stream(self)
            if found is not None:
                self._direct, self._direct_socket = found
        stream = getattr(self.request.connection, "stream", None)
        if stream is None or not stream.writing():
            return None
        try:
            drained: asyncio.Future[None] = stream.write(b"")
        except StreamClosedError:
            return None  # the client left: on_connection_close handles it
        return drained

    async def _stream_one(
        self, request: CompletionRequest, encoder: ChunkEncoder, generation: Generation
    ) -> None:
        index = generation.choice.index
        chat = self.chat
        tool_filter = generation.tool_filter
        top = request.logprobs if tool_filter is None else None

        def on_open() -> None:
            generation.opened = True
            self._start_stream()
            if chat:
                if not self._roles_written:
                    # Every choice's role chunk at once, in index order, whichever choice
                    # opens first: the openai SDK's stream helpers (chat.completions.stream,
                    # ChatCompletionStreamState) append a choice at its first chunk and
                    # index it by position, so a first chunk for index 1 before index 0
                    # crashed them (IndexError) or crossed the choices' texts.
                    self._roles_written = True
                    self._write(b"".join(encoder.role(i) for i in range(len(self._generations))))
            elif generation.choice.prompt_text:
                self._write(encoder.content(index, generation.choice.prompt_text))
            else:
                # The head goes now, as a chat stream's role chunk does: the client knows
                # it was accepted while llama.cpp evaluates the prompt, and the first
                # token's write is then one chunk (docs/benchmarks.md, time to first token).
                self._write(b"")

        def on_events(events: list[dict[str, Any]]) -> Awaitable[None] | None:
            if self._client_gone:
                return None
            if self.ttft is None:  # once per request: one test per read, nothing per token
                self.ttft = self.request.request_time()
            generation.last_event = events[-1]
            # The read's chunks go out as one chunk of the response, as one flush of
            # them did: one frame, one send per read.
            frames: list[bytes] = []
            add = frames.append
            try:
                for event in events:
                    text = event.get("content") or ""
                    if tool_filter is not None:
                        text = tool_filter.feed(text)
                    logprobs = None
                    if top is not None:
                        entries = event.get("completion_probabilities") or []
                        if entries:
                            if chat:
                                logprobs = chat_logprobs(entries, top)
                            else:
                                logprobs = text_logprobs(entries, top, generation.text_offset)
                    if text or logprobs is not None:
                        add(encoder.content(index, text, logprobs))
                        generation.text_offset += len(text)
                    if event.get("stop"):
                        self._charge(generation, event)
                        reason = finish_reason(event.get("stop_type"))
                        if tool_filter is not None:
                            rest, calls = tool_filter.finish()
                            if rest:
                                add(encoder.content(index, rest))
                            if calls:
                                add(encoder.tool_calls(index, calls))
                                reason = "tool_calls"
                        add(encoder.finish(index, reason))
            finally:  # what came before a failure in this read still goes out first
                wait = self._send(frames[0] if len(frames) == 1 else b"".join(frames))
            return wait

        call, client = generation.call, generation.client
        assert call is not None and client is not None
        await client.stream(generation.body, call, on_open, on_events)

    def on_finish(self) -> None:
        super().on_finish()
        for generation in self._generations:
            if generation.call is not None:
                generation.call.forget_failure()  # handled: its tracebacks would be a cycle

    def end_for_shutdown(self, error: ProxyError) -> None:
        """The shutdown timeout: llama.cpp's generations are cancelled and the request ends
        as if they had failed with `error`, so the client gets an answer of its own (a
        stream's final error event, else the 503) rather than a connection cut mid-way."""
        if self._client_gone or self._shutdown is not None:
            return
        self._shutdown = error
        self._stopped = True
        for wait in self._waits:
            wait.cancel()  # _lease turns this cancellation into `error`
        for generation in self._generations:
            if generation.call is not None:
                generation.call.abort(error)

    def on_connection_close(self) -> None:
        self._client_gone = True
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        for wait in self._waits:
            wait.cancel()  # leaves the pool's queue; a slot granted meanwhile passes on
        for generation in self._generations:
            if generation.call is not None:
                generation.call.abort(ClientGone())
        self._charge_unfinished()
        super().on_connection_close()

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, StreamClosedError | ClientGone):
            return  # the client left; on_connection_close already cancelled llama.cpp
        super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if self._client_gone:
            return
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, StreamClosedError | ClientGone):
            return
        super().write_error(status_code, **kwargs)


class ChatCompletionsHandler(CompletionsHandler):
    """POST /v1/chat/completions."""

    chat = True
    endpoint = "/v1/chat/completions"
    records_usage = True


class TextCompletionsHandler(CompletionsHandler):
    """POST /v1/completions."""

    chat = False
    endpoint = "/v1/completions"
    records_usage = True
