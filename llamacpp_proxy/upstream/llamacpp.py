"""The llama.cpp API: /completion (request mapping, SSE events), /props, /tokenize,
/v1/models and /health over the kept-alive connections of upstream/http.py, with the
deadlines of each call, and the translation of upstream failures into ProxyErrors at this boundary.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

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
)
from ..request import CompletionRequest
from .http import (
    READ_SIZE,
    BodyDecoder,
    Connection,
    ConnectionLost,
    ConnectionPool,
    ProtocolError,
    ResponseHead,
    encode_request,
    read_head,
)
from .sse import SSEDecoder

log = logging.getLogger("llamacpp_proxy.upstream")

PROPS_TTL = 60.0  # seconds a /props answer is reused (chat template, BOS/EOS, model path)
ERROR_BODY_LIMIT = 64 * 1024
MAX_RESPONSE = 256 * 1024 * 1024
PLAIN_TOKENS_CACHE_CHARS = 1 << 20  # characters of text whose plain-text tokens are kept
PLAIN_TOKENS_CACHE_ENTRY = 64 * 1024  # longer texts are tokenized every time


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


class UpstreamCall:
    """One request to llama.cpp that can be aborted at any moment, and its timers.

    Before the first byte the deadline is the first-byte timeout (prompt processing, or the
    whole answer when not streamed); after it, the idle timeout between reads. `touch` is on
    the per-read hot path, so it only records the time; the timer re-arms itself lazily.
    """

    __slots__ = (
        "_connection",
        "_first_byte_timeout",
        "_idle_timeout",
        "_loop",
        "_timer",
        "abort_reason",
        "got_first_byte",
        "last_activity",
        "sent",
    )

    def __init__(self, first_byte_timeout: float, idle_timeout: float) -> None:
        self._loop = IOLoop.current()
        self._connection: Connection | None = None
        self._first_byte_timeout = first_byte_timeout
        self._idle_timeout = idle_timeout
        self.abort_reason: BaseException | None = None
        self.got_first_byte = False
        self.sent = False
        """A request byte may have reached llama.cpp (False: failover may re-send it)."""
        self.last_activity = self._loop.time()
        self._timer: object | None = self._loop.call_later(first_byte_timeout, self._check)

    def touch(self) -> None:
        """Data arrived from llama.cpp."""
        self.last_activity = self._loop.time()
        if not self.got_first_byte:
            self.got_first_byte = True
            if self._timer is not None:  # from now on the deadline is the idle timeout
                self._loop.remove_timeout(self._timer)
                self._timer = self._loop.call_later(self._idle_timeout, self._check)

    def _check(self) -> None:
        self._timer = None
        now = self._loop.time()
        if not self.got_first_byte:
            self.abort(
                UpstreamTimeout(
                    f"llama.cpp did not start answering within {self._first_byte_timeout:g}s"
                )
            )
            return
        remaining = self.last_activity + self._idle_timeout - now
        if remaining > 0:
            self._timer = self._loop.call_later(remaining, self._check)
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

    def abort(self, reason: BaseException) -> None:
        """End the upstream request now: closing the connection makes llama.cpp stop
        generating and free its slot."""
        if self.abort_reason is not None:
            return
        self.abort_reason = reason
        if self._connection is not None:
            self._connection.close()

    def done(self) -> None:
        """The request ended: stop the timer."""
        if self._timer is not None:
            self._loop.remove_timeout(self._timer)
            self._timer = None


@dataclass
class Response:
    """A whole (non-streamed) upstream response."""

    status: int
    body: bytes


EventSink = Callable[[list[dict[str, Any]]], "Awaitable[None] | None"]
"""Receives the events of one read; may return an awaitable that resolves once the client
has taken what was written (backpressure)."""


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
            self.base, settings.upstream_max_connections, settings.upstream_connect_timeout
        )
        self._props: dict[str, Any] | None = None
        self._props_at = 0.0
        # Answers that hold for one model: dropped when /props names another.
        self._model: object = None
        self._adds_bos: bool | None = None
        self._plain_tokens: dict[str, list[int]] = {}
        self._plain_chars = 0

    def close(self) -> None:
        """Close the idle upstream connections."""
        self._pool.close()

    # -- metadata ---------------------------------------------------------------------------

    async def props(self) -> dict[str, Any]:
        """llama.cpp's /props (chat_template, bos_token, eos_token, model_path), cached."""
        if self._props is not None and self._now() - self._props_at < PROPS_TTL:
            return self._props
        response = await self._get("/props")
        if response.status == 404:
            props: dict[str, Any] = {}  # a server without /props: no model template, no BOS
        else:
            props = self._json_or_raise(response, "/props")
        self._props, self._props_at = props, self._now()
        model = props.get("model_path") if isinstance(props, dict) else None
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

    async def models(self) -> list[dict[str, Any]]:
        """The models llama.cpp serves, as OpenAI model objects."""
        response = await self._get("/v1/models")
        created = int(time.time())
        if response.status == 200:
            body = self._json_or_raise(response, "/v1/models")
            data = body.get("data") if isinstance(body, dict) else None
            if isinstance(data, list) and data:
                return [
                    {
                        "id": str(m.get("id")),
                        "object": "model",
                        "created": int(m.get("created") or created),
                        "owned_by": str(m.get("owned_by") or "llamacpp"),
                    }
                    for m in data
                    if isinstance(m, dict) and m.get("id")
                ]
        props = await self.props()
        path = str(props.get("model_path") or "llama.cpp")
        return [
            {
                "id": path.rsplit("/", 1)[-1],
                "object": "model",
                "created": created,
                "owned_by": "llamacpp",
            }
        ]

    async def health(self) -> tuple[bool, str]:
        """(ready, why): llama.cpp is reachable and has its model loaded."""
        try:
            response = await self._get("/health", timeout=self._settings.upstream_connect_timeout)
        except ProxyError as exc:
            return False, exc.message
        if response.status == 200:
            return True, "ok"
        if response.status == 503:
            return False, "llama.cpp is loading the model"
        return False, f"llama.cpp /health answered HTTP {response.status}"

    async def _get(self, path: str, timeout: float | None = None) -> Response:
        call = UpstreamCall(
            timeout or self._settings.upstream_first_byte_timeout,
            self._settings.upstream_idle_timeout,
        )
        try:
            return await self._exchange("GET", path, None, call)
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
        on_body: Callable[[bytes], Awaitable[None] | None] | None = None,
    ) -> Response:
        """One request on a pooled connection. With `on_body`, a 200 body goes to it read by
        read; any other body is returned whole (it is an error to report)."""
        request = encode_request(self._pool, method, path, body)
        for attempt in (1, 2):
            try:
                conn, reused = await self._pool.acquire(fresh=attempt > 1)
            except TimeoutError:
                raise UpstreamTimeout(f"timed out connecting to llama.cpp at {self.base}") from None
            except OSError as exc:
                raise _connection_error(exc, self.base) from exc
            call.attach(conn)
            answered = False
            reusable = False
            try:
                call.sent = True
                conn.writer.write(request)
                head = await read_head(conn)
                answered = True
                call.touch()
                if on_head is not None:
                    on_head(head)
                result = await self._read_body(
                    conn, head, method, call, on_body if head.status == 200 else None
                )
                reusable = result[1]
                return Response(head.status, result[0])
            except (ConnectionLost, ConnectionError, OSError, ProtocolError) as exc:
                if call.abort_reason is not None:
                    raise call.abort_reason from None
                if reused and not answered and attempt == 1:
                    call.sent = False  # it never reached llama.cpp either
                    continue  # the server closed an idle connection as we reused it: retry
                raise _connection_error(exc, self.base) from exc
            finally:
                self._pool.release(conn, reusable)
        raise AssertionError("unreachable")

    async def _read_body(
        self,
        conn: Connection,
        head: ResponseHead,
        method: str,
        call: UpstreamCall,
        on_body: Callable[[bytes], Awaitable[None] | None] | None,
    ) -> tuple[bytes, bool]:
        """(collected body, connection reusable)."""
        decoder = BodyDecoder(head, method)
        collected = bytearray()
        read = conn.reader.read
        while not decoder.done:
            data = await read(READ_SIZE)
            if not data:
                if call.abort_reason is not None:
                    raise call.abort_reason
                if decoder.until_eof:
                    break
                raise ConnectionLost("closed before the response was complete")
            call.touch()
            piece = decoder.feed(data)
            if on_body is not None:
                if piece:
                    backlog = on_body(piece)
                    if backlog is not None:
                        # The client reads slower than llama.cpp writes: stop reading (and
                        # so hold llama.cpp back) until our copy is written out, instead of
                        # buffering without bound.
                        await backlog
                        call.touch()
                if call.abort_reason is not None:
                    raise call.abort_reason
            else:
                collected += piece
                if len(collected) > MAX_RESPONSE:
                    raise UpstreamError("llama.cpp's response is too large")
        return bytes(collected), decoder.done and head.keep_alive and not decoder.until_eof

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

    def new_call(self) -> UpstreamCall:
        """A handle for one upstream request, armed with the configured timeouts."""
        return UpstreamCall(
            self._settings.upstream_first_byte_timeout, self._settings.upstream_idle_timeout
        )

    async def complete(self, body: dict[str, Any], call: UpstreamCall) -> dict[str, Any]:
        """A non-streamed /completion: llama.cpp's final result object."""
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

        def on_head(head: ResponseHead) -> None:
            if head.status == 200:
                on_open()

        def on_body(chunk: bytes) -> Awaitable[None] | None:
            nonlocal final
            events = []
            failure: ProxyError | None = None
            for field, payload in decoder.feed(chunk):
                try:
                    event = loads(payload)
                except ValueError:
                    failure = UpstreamError("llama.cpp sent a malformed stream event")
                    break
                if field != "data" or type(event) is not dict or "error" in event:
                    failure = _unusual_event(field, event)
                    if failure is not None:
                        break
                if event.get("stop"):
                    final = True
                events.append(event)
            backlog = on_events(events) if events else None
            if failure is not None:  # events before a failure in the same read went first
                call.abort(failure)
            return backlog

        try:
            response = await self._exchange(
                "POST", "/completion", _encode(body), call, on_head, on_body
            )
            if response.status != 200:
                raise upstream_status_error(response.status, response.body[:ERROR_BODY_LIMIT])
            for _field, payload in decoder.close():
                try:
                    event = loads(payload)
                except ValueError:
                    raise UpstreamError("llama.cpp sent a malformed stream event") from None
                if isinstance(event, dict):
                    final = final or bool(event.get("stop"))
                    on_events([event])
            if not final:
                raise UpstreamError("llama.cpp ended the stream before its final event")
        finally:
            call.done()


def _unusual_event(field: str, event: Any) -> ProxyError | None:
    """The error an event that is not a plain token event stands for (None: it is fine)."""
    if field == "error" or (isinstance(event, dict) and "content" not in event):
        return _stream_error(event)
    if not isinstance(event, dict):
        return UpstreamError("llama.cpp sent a stream event that is not an object")
    return None


def _encode(body: dict[str, Any]) -> bytes:
    return fastjson.dumps(body)


def _connection_error(error: BaseException | None, base: str) -> ProxyError:
    if isinstance(error, TimeoutError | asyncio.TimeoutError):
        return UpstreamTimeout(f"timed out connecting to llama.cpp at {base}")
    if isinstance(error, ProtocolError):
        return UpstreamError(f"llama.cpp sent a malformed HTTP response: {error}")
    if isinstance(error, ConnectionLost | ConnectionResetError | BrokenPipeError):
        return UpstreamError("llama.cpp closed the connection before the response was complete")
    if isinstance(error, socket.gaierror):
        return UpstreamUnavailable(f"cannot resolve llama.cpp's host in {base}")
    if isinstance(error, ConnectionRefusedError):
        return UpstreamUnavailable(f"llama.cpp at {base} refused the connection (is it running?)")
    if isinstance(error, OSError):
        return UpstreamUnavailable(f"cannot reach llama.cpp at {base}: {error}")
    return UpstreamError(f"request to llama.cpp failed: {error}")


def _error_message(payload: Any) -> tuple[str, dict[str, Any]]:
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or "llama.cpp reported an error"), err
    if isinstance(err, str):
        return err, {}
    return "llama.cpp reported an error", {}


def _stream_error(payload: Any) -> ProxyError:
    message, err = _error_message(payload)
    return _classify(int(err.get("code") or 500), message, err)


def upstream_status_error(status: int, body: bytes) -> ProxyError:
    """A llama.cpp error status (and its JSON error body, if any) as our error."""
    try:
        payload = fastjson.loads(body) if body else None
    except ValueError:
        payload = None
    if payload is None:
        text = body[:200].decode("utf-8", "replace").strip()
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
