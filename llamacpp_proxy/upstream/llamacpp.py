"""The llama.cpp API: /completion (request mapping, SSE events), /props, /tokenize and
/health over the kept-alive connections of upstream/http.py, with the deadlines of each
call, and the translation of upstream failures into ProxyErrors at this boundary.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import math
import re
import socket
import sys
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from tornado.ioloop import IOLoop

from .. import fastjson
from ..config import Settings
from ..errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ProxyError,
    UpstreamError,
    UpstreamLoading,
    UpstreamTimeout,
    UpstreamUnavailable,
    drop_tracebacks,
)
from ..request import CompletionRequest
from .http import (
    BodyDecoder,
    BodySink,
    Connection,
    ConnectionLost,
    ConnectionPool,
    ProtocolError,
    ResponseHead,
    encode_request,
)
from .sse import EventTooLarge, SSEDecoder

log = logging.getLogger("llamacpp_proxy.upstream")

PROPS_TTL = 60.0  # seconds a /props answer is reused (chat template, BOS/EOS, model path)
HEALTH_TTL = 0.0  # readiness must reflect llama.cpp now: share only the probe in flight
PROBE_CONNECTIONS = 3
"""Connections of their own for /health, /props, /slots: the prober reads one server's
/health, its /props then /slots, and /slots again while requests wait on outside load,
side by side; two reads that hang must leave /health one (route/upstreams.py)."""
ERROR_BODY_LIMIT = 64 * 1024  # read this much of an error body, then close the connection
MAX_RESPONSE = 64 * 1024 * 1024  # a non-streamed answer (n_probs makes them large)
MAX_MESSAGE = 1000  # characters of llama.cpp's error message passed on
PLAIN_TOKENS_CACHE_CHARS = 1 << 20  # characters of text whose plain-text tokens are kept
PLAIN_TOKENS_CACHE_ENTRY = 64 * 1024  # longer texts are tokenized every time
MAX_EMBEDDING_DIMS = 16384
"""Widest embedding a server is taken to answer (the widest models today have 4096-8192):
with the count of inputs it bounds how much of an /v1/embeddings answer is read."""
# Per input: its float32 vector in base64 (4 bytes -> 5.34 characters) and the item's JSON.
EMBEDDING_ITEM_BYTES = 6 * MAX_EMBEDDING_DIMS + 256
EMBEDDING_SLACK = 64 * 1024  # the answer's own fields (model path, usage)
_LITTLE_ENDIAN = sys.byteorder == "little"
_INPUT_TOO_LARGE = re.compile(r"input \((\d+) tokens\) is too large.*?batch size: (\d+)")


class MixedPrompt(str):
    """A prompt whose text (for logs and echo) llama.cpp must receive as `pieces`: strings
    it tokenizes (special tokens parsed) and token ids it takes as they are. llama.cpp adds
    BOS only when the first piece is a string."""

    pieces: list[str | int]

    def __new__(cls, text: str, pieces: list[str | int]) -> MixedPrompt:
        self = super().__new__(cls, text)
        self.pieces = pieces
        return self


class ClientGone(Exception):
    """The client disconnected; the upstream request is abandoned."""


class ClientStalled(ClientGone):
    """The client took nothing of its stream for the idle timeout while llama.cpp's output
    waited for it: the client's connection is closed (as nginx's `send_timeout` does) and
    the upstream request abandoned. llama.cpp, which had sent, is not blamed."""


class StreamComplete(Exception):
    """llama.cpp's final (`stop: true`) event arrived: the stream's call ends there, its
    connection closed (a stream's connection is never reused) without reading on."""


class UpstreamCall:
    """One request to llama.cpp that can be aborted at any moment, and its timers.

    The first deadline runs from the moment the call is made, so it covers the wait for a
    pool connection too. Not streamed, it is the deadline of the whole answer: a server that
    trickles a byte now and then cannot hold a request longer. Streamed, once the response
    head came the deadline is the idle timeout between events (`touch`), so comments and
    keep-alive pings do not count as progress. `touch` is on the per-read hot path: it only
    records the time; the timer re-arms itself lazily.
    """

    __slots__ = (
        "_connecting",
        "_connection",
        "_first_byte_timeout",
        "_idle_timeout",
        "_live",
        "_loop",
        "_timer",
        "_waiting",
        "abort_reason",
        "got_first_byte",
        "last_activity",
        "sent",
        "status",
        "streamed",
    )

    def __init__(
        self,
        first_byte_timeout: float,
        idle_timeout: float,
        live: set[UpstreamCall] | None = None,
    ) -> None:
        self._loop = IOLoop.current()
        self._live = live  # the client's calls in flight (LlamaCppClient.abort_silent)
        if live is not None:
            live.add(self)
        self._connection: Connection | None = None
        self._waiting: asyncio.Task[Any] | None = None
        self._connecting = False  # the wait for a connection is a connect, not a slot
        self._first_byte_timeout = first_byte_timeout
        self._idle_timeout = idle_timeout
        self.abort_reason: BaseException | None = None
        self.got_first_byte = False
        self.streamed = False
        self.sent = False
        """A request byte may have reached llama.cpp (False: failover may re-send it)."""
        self.status: int | None = None
        """The response head's status once read: only a 503 head proves llama.cpp refused
        to start the generation (failover); an error inside a 200 answer does not."""
        self.last_activity = self._loop.time()
        self._timer: object | None = self._loop.call_later(first_byte_timeout, self._check)

    def started(self) -> None:
        """The response head arrived: a stream's deadline becomes the idle timeout."""
        self.last_activity = self._loop.time()
        self.got_first_byte = True
        if self.streamed and self._timer is not None:
            self._loop.remove_timeout(self._timer)
            self._timer = self._loop.call_later(self._idle_timeout, self._check)

    def touch(self) -> None:
        """Events arrived from llama.cpp."""
        self.last_activity = self._loop.time()

    def _check(self) -> None:
        self._timer = None
        now = self._loop.time()
        if not self.got_first_byte or not self.streamed:
            if self._waiting is not None and self._connecting:
                message = f"timed out connecting to llama.cpp within {self._first_byte_timeout:g}s"
            elif self._waiting is not None:
                message = (
                    "every connection to llama.cpp stayed busy for "
                    f"{self._first_byte_timeout:g}s (--upstream-max-connections)"
                )
            elif self.got_first_byte:
                message = f"llama.cpp did not finish answering within {self._first_byte_timeout:g}s"
            else:
                message = f"llama.cpp did not start answering within {self._first_byte_timeout:g}s"
            self.abort(UpstreamTimeout(message))
            return
        remaining = self.last_activity + self._idle_timeout - now
        if remaining > 0:
            self._timer = self._loop.call_later(remaining, self._check)
        elif self._connection is not None and self._connection.held_back:
            # Nothing was read because the client has not taken the last read's bytes
            # (reading resumes, and the clock restarts, once it has): the silence is the
            # client's, not llama.cpp's.
            self.abort(ClientStalled(f"the client took nothing for {self._idle_timeout:g}s"))
        else:
            self.abort(
                UpstreamTimeout(
                    f"llama.cpp sent nothing for {self._idle_timeout:g}s in mid-response"
                )
            )

    def attach(self, connection: Connection) -> None:
        """The connection this call's request uses (closed at once if already aborted)."""
        self._connection = connection
        if self.abort_reason is not None:
            connection.close()

    def detach(self) -> None:
        """The exchange is over and its connection goes back to the pool, for the next
        request: an abort of this call from now on (a sibling choice failing, the client
        leaving) must not close it under whoever takes it."""
        self._connection = None

    def abort(self, reason: BaseException) -> None:
        """End the upstream request now: closing the connection makes llama.cpp stop
        generating and free its slot; a wait for a connection is cancelled."""
        if self.abort_reason is not None:
            return
        self.abort_reason = reason
        if self._connection is not None:
            self._connection.close()
        if self._waiting is not None:
            self._waiting.cancel()

    async def acquire(self, pool: ConnectionPool, spare: bool = False) -> Connection:
        """A connection from `pool`, waiting no longer than this call may live (`spare`:
        see ConnectionPool.acquire)."""
        if self.abort_reason is not None:
            raise self.abort_reason
        task = asyncio.current_task()
        self._waiting = task
        try:
            return await pool.acquire(spare, self._mark_connecting)
        except asyncio.CancelledError:
            # Our own abort cancelled the wait: report why, as the task's only cancellation.
            if self.abort_reason is not None and task is not None and task.uncancel() == 0:
                raise self.abort_reason from None
            raise
        finally:
            self._waiting = None

    def _mark_connecting(self) -> None:
        self._connecting = True

    def forget_failure(self) -> None:
        """The request is over and its failure handled (logged, charged, answered): drop
        the tracebacks `abort_reason` keeps (and those of the errors it came from). They
        hold the frames of the coroutines it went through, which hold this call: about 100
        objects a failed request that only a full collection frees (a 40 ms pause after a
        thousand streams were cut at once)."""
        drop_tracebacks(self.abort_reason)
        if self._connection is not None:
            self._connection.forget_failure()

    def done(self) -> None:
        """The request ended: stop the timer."""
        if self._timer is not None:
            self._loop.remove_timeout(self._timer)
            self._timer = None
        if self._live is not None:
            self._live.discard(self)
            self._live = None


@dataclass
class Response:
    """A whole (non-streamed) upstream response."""

    status: int
    body: bytes


@dataclass
class EmbeddingsResult:
    """llama.cpp's embeddings, one float32 vector per input in input order, and the tokens
    its tokenizer counted over all inputs."""

    vectors: list[array[float]]
    prompt_tokens: int


EventSink = Callable[[list[dict[str, Any]]], "Awaitable[None] | None"]
"""Receives the events of one read; may return an awaitable that resolves once the client
has taken what was written (backpressure)."""

T = TypeVar("T")


class Shared(Generic[T]):
    """One fetch in flight for every caller, and its result reused for `ttl` seconds, so
    however many clients ask, the upstream sees at most one request per `ttl`."""

    def __init__(
        self, fetch: Callable[[], Awaitable[T]], ttl: float, now: Callable[[], float]
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._now = now
        self._value: T | None = None
        self._at = 0.0
        self._task: asyncio.Future[T] | None = None

    async def get(self) -> T:
        """The cached value, or the one the fetch in flight (started if none) brings."""
        if self._value is not None and self._now() - self._at < self._ttl:
            return self._value
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        # Shielded: a caller that goes away does not cancel the others' fetch.
        return await asyncio.shield(self._task)

    async def _run(self) -> T:
        try:
            value = await self._fetch()
            self._value, self._at = value, self._now()
            return value
        finally:
            self._task = None


class LlamaCppClient:
    """Talks to one llama.cpp server."""

    def __init__(
        self,
        settings: Settings,
        now: Callable[[], float] = time.monotonic,
        *,
        base_url: str | None = None,
    ) -> None:
        # One client per server: base_url is that server's (default: the first configured).
        self.base = (base_url or settings.upstream_url).rstrip("/")
        self._settings = settings
        self._now = now
        self._pool = ConnectionPool(
            self.base,
            settings.upstream_max_connections,
            settings.upstream_connect_timeout,
            spares=settings.upstream_spare_connections,
        )
        # Probes never queue behind completions, and a flood of them costs at most
        # PROBE_CONNECTIONS upstream connections.
        self._probe_pool = ConnectionPool(
            self.base, PROBE_CONNECTIONS, settings.upstream_connect_timeout
        )
        self._live: set[UpstreamCall] = set()
        """Calls in flight to this server (each removes itself when done)."""
        self.where = self._pool.display
        """llama.cpp's host:port (never the URL: it may hold a password)."""
        self._props = Shared(self._fetch_props, PROPS_TTL, now)
        self._health = Shared(self._fetch_health, HEALTH_TTL, now)
        # Answers that hold for one model: dropped when /props names another.
        self._model: object = None
        self._adds_bos: bool | None = None
        self._plain_tokens: dict[str, list[int]] = {}
        self._plain_chars = 0

    def close(self) -> None:
        """Close the idle upstream connections."""
        self._pool.close()
        self._probe_pool.close()

    # -- metadata ---------------------------------------------------------------------------

    async def props(self) -> dict[str, Any]:
        """llama.cpp's /props (chat_template, bos_token, eos_token, model_path), cached."""
        return await self._props.get()

    async def _fetch_props(self) -> dict[str, Any]:
        response = await self._get("/props")
        if response.status == 404:
            return {}  # a server without /props: no model template, no BOS
        props = self._json_or_raise(response, "/props")
        if not isinstance(props, dict):
            raise UpstreamError("llama.cpp answered /props with a non-object")
        model = props.get("model_path")
        if model != self._model:
            self._model, self._adds_bos = model, None
            self._plain_tokens, self._plain_chars = {}, 0
        return props

    async def tokenize(
        self, text: str, *, add_special: bool = False, parse_special: bool = True
    ) -> list[int] | None:
        """llama.cpp's /tokenize of text; None when the server has no /tokenize."""
        body = {"content": text, "add_special": add_special, "parse_special": parse_special}
        call = self.new_call()
        try:
            response = await self._exchange("POST", "/tokenize", _encode(body), call)
        finally:
            call.done()
        if response.status == 404:
            return None
        answer = self._json_or_raise(response, "/tokenize")
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise UpstreamError("llama.cpp answered /tokenize without a list of token ids")
        return tokens

    async def adds_bos(self) -> bool:
        """Whether llama.cpp adds BOS to the prompts it tokenizes, asked once per model.

        /props names a `bos_token` even for models that get none (SmolLM2 names
        `<|im_start|>`), so the answer comes from tokenizing with and without
        `add_special`. A server without /tokenize is taken to add it (llama.cpp's default).
        """
        await self.props()  # notices a model change, which drops the cached answer
        if self._adds_bos is None:
            with_special = await self.tokenize("a", add_special=True)
            without = await self.tokenize("a")
            self._adds_bos = (
                with_special is None
                or without is None
                or (len(with_special) == len(without) + 1 and with_special[1:] == without)
            )
        return self._adds_bos

    async def plain_tokens(self, text: str) -> list[int]:
        """text as llama.cpp tokenizes it with special-token parsing off (a control token
        written in it stays characters), cached per model within a fixed budget."""
        await self.props()
        cached = self._plain_tokens.pop(text, None)
        if cached is None:
            tokens = await self.tokenize(text, parse_special=False)
            if tokens is None:
                raise UpstreamError(
                    "llama.cpp has no /tokenize, so message content that looks like a "
                    "control token cannot be sent as plain text; upgrade llama.cpp or start "
                    "the proxy with --allow-content-control-tokens"
                )
            cached = tokens
            if len(text) > PLAIN_TOKENS_CACHE_ENTRY:
                return cached
            self._plain_chars += len(text)
            while self._plain_chars > PLAIN_TOKENS_CACHE_CHARS and self._plain_tokens:
                oldest = next(iter(self._plain_tokens))
                del self._plain_tokens[oldest]
                self._plain_chars -= len(oldest)
        self._plain_tokens[text] = cached  # most recently used last
        return cached

    async def health(self) -> tuple[bool, str]:
        """(ready, why): llama.cpp is reachable and has its model loaded. One probe in
        flight at a time, its answer shared by every caller that asked meanwhile."""
        return await self._health.get()

    async def _fetch_health(self) -> tuple[bool, str]:
        try:
            response = await self._get("/health", timeout=self._settings.upstream_connect_timeout)
        except ProxyError as exc:
            return False, exc.message
        if response.status == 200:
            return True, "ok"
        if response.status == 503:
            return False, "llama.cpp is loading the model"
        return False, f"llama.cpp /health answered HTTP {response.status}"

    async def _get(
        self, path: str, timeout: float | None = None, limit: int = MAX_RESPONSE
    ) -> Response:
        call = UpstreamCall(
            timeout or self._settings.upstream_first_byte_timeout,
            self._settings.upstream_idle_timeout,
        )
        try:
            return await self._exchange("GET", path, None, call, pool=self._probe_pool, limit=limit)
        finally:
            call.done()

    def _json_or_raise(self, response: Response, what: str) -> Any:
        if response.status != 200:
            raise upstream_status_error(response.status, response.body)
        try:
            return fastjson.loads(response.body)
        except ValueError:
            raise UpstreamError(f"llama.cpp answered {what} with malformed JSON") from None

    async def _exchange(
        self,
        method: str,
        path: str,
        body: bytes | None,
        call: UpstreamCall,
        on_head: Callable[[ResponseHead], None] | None = None,
        on_body: BodySink | None = None,
        pool: ConnectionPool | None = None,
        limit: int = MAX_RESPONSE,
    ) -> Response:
        """One request on a pooled connection, sent once: a request that may have reached
        llama.cpp is never repeated (it may be generating already). With `on_body`, a 200
        body goes to it read by read; any other body is returned whole (it is an error to
        report)."""
        pool = pool or self._pool
        request = encode_request(pool, method, path, body)
        try:
            conn = await call.acquire(pool, spare=on_body is not None)
        except TimeoutError:
            raise UpstreamTimeout(f"timed out connecting to llama.cpp at {self.where}") from None
        except OSError as exc:
            raise _connection_error(exc, self.where) from exc
        call.attach(conn)
        reusable = False
        try:
            call.sent = True
            conn.send(request)
            head = await conn.read_head()
            if call.abort_reason is not None:
                # The deadline (or the client leaving) won the race with a head that was
                # already buffered: the call is over, so its answer is not relayed.
                raise call.abort_reason
            call.status = head.status
            call.started()
            if on_head is not None:
                on_head(head)
            data, reusable = await self._read_body(
                conn, head, method, call, on_body if head.status == 200 else None, limit
            )
            return Response(head.status, data)
        except (ConnectionLost, ConnectionError, OSError, ProtocolError) as exc:
            if call.abort_reason is not None:
                raise call.abort_reason from None
            raise _connection_error(exc, self.where) from exc
        finally:
            if reusable:
                call.detach()
            pool.release(conn, reusable)

    async def _read_body(
        self,
        conn: Connection,
        head: ResponseHead,
        method: str,
        call: UpstreamCall,
        on_body: BodySink | None,
        ok_limit: int = MAX_RESPONSE,
    ) -> tuple[bytes, bool]:
        """(collected body, connection reusable). A collected body is bounded as it is
        read: an error body is cut at ERROR_BODY_LIMIT (and the connection closed), a 200
        body over `ok_limit` (MAX_RESPONSE unless the caller knows better) is an error."""
        decoder = BodyDecoder(head, method)
        limit = ok_limit if head.status == 200 else ERROR_BODY_LIMIT
        declared = decoder.declared_length
        if on_body is None and head.status == 200 and declared is not None and declared > limit:
            raise UpstreamError("llama.cpp's response is too large")
        if on_body is not None:
            await conn.read_body(decoder, on_body=on_body, progress=call.touch)
            # Never reused: llama-server (b11434) closes the connection a moment after every
            # streamed answer without saying Connection: close, and a request sent on it in
            # that moment is lost (a POST that may have reached it is never sent again).
            return b"", False
        body, complete = await conn.read_body(decoder, limit)
        if not complete:
            if head.status == 200:
                raise UpstreamError("llama.cpp's response is too large")
            # Enough of an error to report it; the rest is not worth reading.
            return body[:limit], False
        return body, decoder.done and not decoder.extra and head.keep_alive

    # -- completions ------------------------------------------------------------------------

    def completion_body(
        self, request: CompletionRequest, prompt: str, choice: int
    ) -> dict[str, Any]:
        """The /completion body for one choice of a request (its output constraint already
        merged into `json_schema` or `grammar` by render/constraints.py)."""
        body: dict[str, Any] = {
            "prompt": prompt.pieces if type(prompt) is MixedPrompt else prompt,
            "stream": request.stream,
        }
        if request.max_tokens is not None:
            body["n_predict"] = request.max_tokens
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            value = getattr(request, name)
            if value is not None:
                body[name] = value
        if request.seed is not None:
            # Each of n choices is its own generation: give each its own (reproducible) seed.
            body["seed"] = request.seed + choice if request.n > 1 else request.seed
        if request.stop:
            body["stop"] = request.stop
        if request.logit_bias:
            body["logit_bias"] = [[token, bias] for token, bias in request.logit_bias.items()]
        if request.logprobs is not None:
            body["n_probs"] = max(1, request.logprobs)
        body.update(request.extensions)
        if request.json_schema is not None:
            # After the extensions, so that nothing passed through can replace it.
            body["json_schema"] = request.json_schema
        return body

    # -- embeddings -------------------------------------------------------------------------

    async def embeddings(
        self, inputs: list[str] | list[list[int]], call: UpstreamCall
    ) -> EmbeddingsResult:
        """llama.cpp's /v1/embeddings (a server started with --embeddings and a pooling type)
        of every input, one call. Asked in base64: a quarter of the bytes of decimal floats
        and nothing to parse per number. The answer is read up to what `len(inputs)` vectors
        can take and checked whole (count, indexes, sizes, finite values): anything else is a
        502, and llama.cpp's refusals are the client's 400s."""
        body = _encode({"input": inputs, "encoding_format": "base64"})
        limit = EMBEDDING_SLACK + len(inputs) * EMBEDDING_ITEM_BYTES
        try:
            response = await self._exchange("POST", "/v1/embeddings", body, call, limit=limit)
            if response.status != 200:
                raise embeddings_status_error(response.status, response.body)
            return parse_embeddings(response.body, len(inputs))
        finally:
            call.done()

    def new_call(self) -> UpstreamCall:
        """A handle for one upstream request, armed with the configured timeouts."""
        return UpstreamCall(
            self._settings.upstream_first_byte_timeout,
            self._settings.upstream_idle_timeout,
            self._live,
        )

    @property
    def in_flight(self) -> int:
        """Calls to this server not yet done."""
        return len(self._live)

    async def reachable(self) -> bool:
        """False only when nothing takes a TCP connection at the server's address within
        --upstream-connect-timeout: its machine or network is gone (a busy or hung
        llama-server still does; a resolver that fails is no answer: ConnectionPool.reachable)."""
        return await self._pool.reachable()

    def abort_silent(self, silent_for: float, reason: Callable[[], ProxyError]) -> int:
        """End every request in flight to this server that has heard nothing from it for
        `silent_for` seconds, each with its own `reason()`: the prober found the server
        unreachable, and a machine gone sends no reset. Returns how many it ended."""
        now = IOLoop.current().time()
        silent = [c for c in self._live if now - c.last_activity >= silent_for]
        for call in silent:
            call.abort(reason())
        return len(silent)

    async def complete(self, body: dict[str, Any], call: UpstreamCall) -> dict[str, Any]:
        """A non-streamed /completion: llama.cpp's final result object, checked."""
        try:
            response = await self._exchange("POST", "/completion", _encode(body), call)
            if response.status != 200:
                raise upstream_status_error(response.status, response.body)
            try:
                result = fastjson.loads(response.body)
            except ValueError:
                raise UpstreamError("llama.cpp answered /completion with malformed JSON") from None
            if not isinstance(result, dict):
                raise UpstreamError("llama.cpp answered /completion with a non-object")
            if "error" in result:  # an error object with status 200 is still an error
                raise _stream_error(result)
            problem = event_problem(result)
            if problem is not None:
                raise UpstreamError(f"llama.cpp answered /completion with {problem}")
            return result
        finally:
            call.done()

    async def stream(
        self,
        body: dict[str, Any],
        call: UpstreamCall,
        on_open: Callable[[], None],
        on_events: EventSink,
    ) -> None:
        """A streamed /completion. `on_open` runs once llama.cpp answers 200; `on_events`
        once per network read with every event that read completed (so the caller can
        flush once per read). Returns after the final (`stop: true`) event; raises a
        ProxyError on any failure, before or after `on_open`."""
        decoder = SSEDecoder()
        final = False
        loads = fastjson.loads
        call.streamed = True

        def on_head(head: ResponseHead) -> None:
            if head.status == 200:
                on_open()

        def parse(field: str, payload: bytes) -> dict[str, Any]:
            try:
                event = loads(payload)
            except ValueError:
                raise UpstreamError("llama.cpp sent a malformed stream event") from None
            if field != "data" or type(event) is not dict or "error" in event:
                raise _unusual_event(field, event)
            problem = event_problem(event)
            if problem is not None:
                raise UpstreamError(f"llama.cpp sent a stream event with {problem}")
            return event

        def on_body(chunk: bytes) -> Awaitable[None] | None:
            nonlocal final
            events = []
            failure: ProxyError | None = None
            try:
                # parse() and the stop test, inlined: this loop runs once per token.
                for field, payload in decoder.feed(chunk):
                    try:
                        event = loads(payload)
                    except ValueError:
                        raise UpstreamError("llama.cpp sent a malformed stream event") from None
                    if field != "data" or type(event) is not dict or "error" in event:
                        raise _unusual_event(field, event)
                    problem = event_problem(event)
                    if problem is not None:
                        raise UpstreamError(f"llama.cpp sent a stream event with {problem}")
                    events.append(event)
                    if event.get("stop"):
                        final = True
                        break  # the answer is whole: nothing after it is part of it
            except ProxyError as exc:
                failure = exc
            except EventTooLarge as exc:
                failure = UpstreamError(f"llama.cpp sent {exc}")
            backlog = None
            if events:
                call.touch()  # only events are progress: comments and pings are not
                backlog = on_events(events)
            if failure is not None:  # events before a failure in the same read went first
                call.abort(failure)
            elif final:
                # llama.cpp's final event ends the answer: the stream is not read to its
                # framing's end (the terminating chunk), so an upstream that stalls, sends
                # more events or closes without that chunk after it cannot turn a whole
                # answer into an error, and the client's end is not held for one more read.
                call.abort(StreamComplete())
            return backlog

        try:
            response = await self._exchange(
                "POST", "/completion", _encode(body), call, on_head, on_body
            )
            if response.status != 200:
                raise upstream_status_error(response.status, response.body)
            try:
                tail = decoder.close()
            except EventTooLarge as exc:
                raise UpstreamError(f"llama.cpp sent {exc}") from None
            for field, payload in tail:
                event = parse(field, payload)
                final = final or bool(event.get("stop"))
                on_events([event])
            if not final:
                raise UpstreamError("llama.cpp ended the stream before its final event")
        except StreamComplete:
            pass  # the final event arrived (on_body): the stream ended whole
        finally:
            call.done()


def _bad_embeddings(problem: str) -> UpstreamError:
    return UpstreamError(f"llama.cpp answered /v1/embeddings with {problem}")


def parse_embeddings(data: bytes, count: int) -> EmbeddingsResult:
    """A 200 /v1/embeddings answer (base64 vectors) for `count` inputs, checked: one vector
    per index 0..count-1, all of one width, every value a finite float32; the usage's
    prompt_tokens a count. Anything else raises UpstreamError (502)."""
    try:
        answer = fastjson.loads(data)
    except ValueError:
        raise _bad_embeddings("malformed JSON") from None
    items = answer.get("data") if type(answer) is dict else None
    if type(items) is not list:
        raise _bad_embeddings("no 'data' list")
    if len(items) != count:
        raise _bad_embeddings(f"{len(items)} embeddings for {count} inputs")
    vectors: list[array[float] | None] = [None] * count
    width = -1
    for item in items:
        index = item.get("index") if type(item) is dict else None
        if type(index) is not int or not 0 <= index < count or vectors[index] is not None:
            raise _bad_embeddings("an item without its own index among the inputs")
        text = item.get("embedding")
        if type(text) is not str:
            raise _bad_embeddings("an embedding that is not base64 text")
        try:
            raw = binascii.a2b_base64(text, strict_mode=True)
        except (binascii.Error, ValueError):
            raise _bad_embeddings("an embedding that is not valid base64") from None
        if width < 0:
            width = len(raw)
        if not raw or len(raw) % 4 or len(raw) != width:
            raise _bad_embeddings("embeddings of no, broken or different sizes")
        vector = array("f")
        vector.frombytes(raw)
        if not _LITTLE_ENDIAN:
            vector.byteswap()  # llama.cpp's base64 is little-endian float32
        # One sum in C: any NaN or infinity makes it non-finite; float32 values cannot
        # overflow a double's sum.
        if not math.isfinite(sum(vector)):
            raise _bad_embeddings("an embedding holding NaN or infinity")
        vectors[index] = vector
    usage = answer.get("usage")
    tokens = usage.get("prompt_tokens") if type(usage) is dict else None
    if type(tokens) is not int or tokens < 0:
        raise _bad_embeddings("no 'usage.prompt_tokens' count")
    return EmbeddingsResult([v for v in vectors if v is not None], tokens)


def embeddings_status_error(status: int, body: bytes) -> ProxyError:
    """llama.cpp's refusal of /v1/embeddings as the client's error: a server that computes
    no embeddings, or an input it cannot take, is a 400 naming what to change (never a 5xx
    for what the request or the server's flags decide)."""
    error = upstream_status_error(status, body)
    message = error.message
    if status == 501 or "not support embeddings" in message:
        return InvalidRequest(
            "This model's llama.cpp server computes no embeddings: start llama-server with "
            f"--embeddings --pooling mean. (llama.cpp: {message})",
            param="model",
            code="embeddings_not_supported",
        )
    if "Pooling type" in message:
        return InvalidRequest(
            "This model's llama.cpp server pools no embedding per input: start llama-server "
            f"with --pooling mean (or cls, last). (llama.cpp: {message})",
            param="model",
            code="embeddings_not_supported",
        )
    found = _INPUT_TOO_LARGE.search(message)
    if found is not None:
        return ContextLengthExceeded(
            f"An input is {found[1]} tokens; this model's server embeds at most {found[2]} "
            "tokens per input (llama-server --batch-size and --ubatch-size). Shorten it.",
            param="input",
        )
    if isinstance(error, InvalidRequest):
        error.param = "input"  # empty content, invalid token ids, context exceeded
    return error


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def event_problem(event: dict[str, Any]) -> str | None:
    """What is wrong with a /completion result or stream event, in the fields the proxy
    reads (None: nothing). Runs once per streamed token, so it only checks types, and the
    common partial event (a text, `stop: false`, counts, nothing else the proxy reads) is
    recognised in one expression before the field-by-field checks that name a problem."""
    get = event.get
    content = get("content")
    stop = get("stop")
    predicted = get("tokens_predicted")
    evaluated = get("tokens_evaluated")
    if (
        type(content) is str
        and (stop is False or stop is None)
        and (predicted is None or (type(predicted) is int and predicted >= 0))
        and (evaluated is None or (type(evaluated) is int and evaluated >= 0))
        and get("stop_type") is None
        and get("completion_probabilities") is None
    ):
        return None
    return _event_problem(event)


def _event_problem(event: dict[str, Any]) -> str | None:
    """event_problem, field by field (the fast test above is exactly its None case)."""
    get = event.get
    if type(get("content")) is not str:
        return "a 'content' that is not a string"
    for name in ("tokens_predicted", "tokens_evaluated"):
        count = get(name)
        if count is not None and (type(count) is not int or count < 0):
            return f"a '{name}' that is not a non-negative integer"
    stop_type = get("stop_type")
    if stop_type is not None and type(stop_type) is not str:
        return "a 'stop_type' that is not a string"
    stop = get("stop")
    if stop is not None and type(stop) is not bool:
        return "a 'stop' that is not a boolean"
    probs = get("completion_probabilities")
    if probs is not None and not _valid_probabilities(probs):
        return "malformed 'completion_probabilities'"
    return None


def _valid_probabilities(entries: Any) -> bool:
    if type(entries) is not list:
        return False
    for entry in entries:
        if type(entry) is not dict or not _valid_probability(entry):
            return False
        alts = entry.get("top_logprobs")
        if alts is not None:
            if type(alts) is not list:
                return False
            for alt in alts:
                if type(alt) is not dict or not _valid_probability(alt):
                    return False
    return True


def _valid_probability(entry: dict[str, Any]) -> bool:
    token, logprob, raw = entry.get("token", ""), entry.get("logprob", 0.0), entry.get("bytes")
    return (
        type(token) is str
        and type(logprob) in (int, float)
        and (raw is None or (type(raw) is list and all(type(b) is int for b in raw)))
    )


def _unusual_event(field: str, event: Any) -> ProxyError:
    """The error an event that is not a plain token event stands for."""
    if field == "error" or isinstance(event, dict):
        return _stream_error(event)  # llama.cpp's error object, or an event with no content
    return UpstreamError("llama.cpp sent a stream event that is not an object")


def _encode(body: dict[str, Any]) -> bytes:
    return fastjson.dumps(body)


def _connection_error(error: BaseException | None, where: str) -> ProxyError:
    """A connection failure as our error; `where` is host:port, never the URL."""
    if isinstance(error, TimeoutError | asyncio.TimeoutError):
        return UpstreamTimeout(f"timed out connecting to llama.cpp at {where}")
    if isinstance(error, ProtocolError):
        return UpstreamError(f"llama.cpp sent a malformed HTTP response: {error}")
    if isinstance(error, ConnectionLost | ConnectionResetError | BrokenPipeError):
        return UpstreamError("llama.cpp closed the connection before the response was complete")
    if isinstance(error, socket.gaierror):
        return UpstreamUnavailable(f"cannot resolve llama.cpp's host {where}")
    if isinstance(error, ConnectionRefusedError):
        return UpstreamUnavailable(f"llama.cpp at {where} refused the connection (is it running?)")
    if isinstance(error, OSError):
        return UpstreamUnavailable(f"cannot reach llama.cpp at {where}: {error}")
    return UpstreamError(f"request to llama.cpp failed: {error}")


def _error_message(payload: Any) -> tuple[str, dict[str, Any]]:
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict):
        message = err.get("message")
        if isinstance(message, str) and message:
            return message[:MAX_MESSAGE], err
        return "llama.cpp reported an error", err
    if isinstance(err, str) and err:
        return err[:MAX_MESSAGE], {}
    return "llama.cpp reported an error", {}


def _stream_error(payload: Any) -> ProxyError:
    """An error object llama.cpp sent in place of a result (an `error:` event, or a body
    with status 200), classified by the HTTP status in its `code` (500 when it has none)."""
    message, err = _error_message(payload)
    code = err.get("code")
    status = code if type(code) is int and 400 <= code <= 599 else 500
    return _classify(status, message, err)


def upstream_status_error(status: int, body: bytes) -> ProxyError:
    """A llama.cpp error status (and its JSON error body, if any) as our error."""
    try:
        payload = fastjson.loads(body) if body else None
    except ValueError:
        payload = None
    if payload is None:
        text = body[:MAX_MESSAGE].decode("utf-8", "replace").strip()
        message = text or f"llama.cpp answered HTTP {status}"
        err: dict[str, Any] = {}
    else:
        message, err = _error_message(payload)
    return _classify(status, message, err)


def _classify(status: int, message: str, err: dict[str, Any]) -> ProxyError:
    if err.get("type") == "exceed_context_size_error" or "exceeds the available context" in message:
        n_prompt, n_ctx = err.get("n_prompt_tokens"), err.get("n_ctx")
        if isinstance(n_prompt, int) and isinstance(n_ctx, int):
            message = (
                f"This model's maximum context length is {n_ctx} tokens. However, your "
                f"messages resulted in {n_prompt} tokens. Please reduce the length of "
                "the messages or completion."
            )
        return ContextLengthExceeded(message, param="messages")
    if status == 503:
        return UpstreamLoading(f"llama.cpp is not ready: {message}", headers={"Retry-After": "5"})
    if status in (401, 403):
        return UpstreamError(
            "llama.cpp refused the proxy's request (does llama.cpp have --api-key set?)"
        )
    if status == 404:
        return UpstreamError(
            f"llama.cpp has no such endpoint; is --llamacpp-server right? ({message})"
        )
    if 400 <= status < 500:
        return InvalidRequest(
            f"llama.cpp rejected the request: {message}", code="upstream_invalid_request"
        )
    return UpstreamError(f"llama.cpp failed (HTTP {status}): {message}")
