"""The upstream client: llama.cpp's /completion, /props, /v1/models and /health over
AsyncHTTPClient, SSE event parsing, and translation of upstream failures into ProxyErrors
at this boundary.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from tornado.httpclient import HTTPClientError, HTTPRequest, HTTPResponse
from tornado.ioloop import IOLoop
from tornado.simple_httpclient import (
    HTTPStreamClosedError,
    HTTPTimeoutError,
    SimpleAsyncHTTPClient,
    _HTTPConnection,
)

from .config import Settings
from .errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ProxyError,
    UpstreamError,
    UpstreamLoading,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .openai_request import CompletionRequest
from .sse import SSEDecoder

log = logging.getLogger("llamacpp_proxy.upstream")

PROPS_TTL = 60.0  # seconds a /props answer is reused (chat template, BOS/EOS, model path)
ERROR_BODY_LIMIT = 64 * 1024
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


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
    )

    def __init__(self, first_byte_timeout: float, idle_timeout: float) -> None:
        self._loop = IOLoop.current()
        self._connection: _HTTPConnection | None = None
        self._first_byte_timeout = first_byte_timeout
        self._idle_timeout = idle_timeout
        self.abort_reason: BaseException | None = None
        self.got_first_byte = False
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

    def attach(self, connection: _HTTPConnection) -> None:
        """Called by the HTTP client when the connection object for this call exists."""
        self._connection = connection
        if self.abort_reason is not None:
            self._loop.add_callback(self._abort_connection)

    def abort(self, reason: BaseException) -> None:
        """End the upstream request now: closing the connection makes llama.cpp stop
        generating and free its slot."""
        if self.abort_reason is not None:
            return
        self.abort_reason = reason
        self._abort_connection()

    def _abort_connection(self) -> None:
        if self._connection is not None:
            reason = self.abort_reason or ClientGone()
            self._connection._handle_exception(type(reason), reason, None)

    def done(self) -> None:
        """The request ended: stop the timer."""
        if self._timer is not None:
            self._loop.remove_timeout(self._timer)
            self._timer = None


class _AbortableConnection(_HTTPConnection):
    """Hands itself to the UpstreamCall of its request, so the call can abort it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        call = getattr(self.request.request, "upstream_call", None)  # type: ignore[attr-defined]
        if call is not None:
            call.attach(self)


class _AbortableHTTPClient(SimpleAsyncHTTPClient):
    def _connection_class(self) -> type:
        return _AbortableConnection


EventSink = Callable[[list[dict[str, Any]]], None]


class LlamaCppClient:
    """Talks to one llama.cpp server."""

    def __init__(self, settings: Settings, now: Callable[[], float] = time.monotonic) -> None:
        self.base = settings.upstream_url
        self._settings = settings
        self._now = now
        self._http = _AbortableHTTPClient(
            force_instance=True,
            max_clients=settings.upstream_max_connections,
            max_body_size=256 * 1024 * 1024,
        )
        self._props: dict[str, Any] | None = None
        self._props_at = 0.0

    def close(self) -> None:
        """Release the HTTP client."""
        self._http.close()

    # -- metadata ---------------------------------------------------------------------------

    async def props(self) -> dict[str, Any]:
        """llama.cpp's /props (chat_template, bos_token, eos_token, model_path), cached."""
        if self._props is not None and self._now() - self._props_at < PROPS_TTL:
            return self._props
        response = await self._get("/props")
        if response.code == 404:
            props: dict[str, Any] = {}  # a server without /props: no model template, no BOS
        else:
            props = self._json_or_raise(response, "/props")
        self._props, self._props_at = props, self._now()
        return props

    async def models(self) -> list[dict[str, Any]]:
        """The models llama.cpp serves, as OpenAI model objects."""
        response = await self._get("/v1/models")
        created = int(time.time())
        if response.code == 200:
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
        if response.code == 200:
            return True, "ok"
        if response.code == 503:
            return False, "llama.cpp is loading the model"
        return False, f"llama.cpp /health answered HTTP {response.code}"

    async def _get(self, path: str, timeout: float | None = None) -> HTTPResponse:
        request = HTTPRequest(
            self.base + path,
            headers={"Accept": "application/json"},
            connect_timeout=self._settings.upstream_connect_timeout,
            request_timeout=timeout or self._settings.upstream_first_byte_timeout,
        )
        try:
            response = await self._http.fetch(request, raise_error=False)
        except Exception as exc:
            raise _connection_error(exc, self.base) from exc
        if response.code == 599:
            raise _connection_error(response.error, self.base)
        return response

    def _json_or_raise(self, response: HTTPResponse, what: str) -> Any:
        if response.code != 200:
            raise upstream_status_error(response.code, response.body or b"")
        try:
            return json.loads(response.body)
        except ValueError:
            raise UpstreamError(f"llama.cpp answered {what} with malformed JSON") from None

    # -- completions ------------------------------------------------------------------------

    def completion_body(
        self, request: CompletionRequest, prompt: str, choice: int
    ) -> dict[str, Any]:
        """The /completion body for one choice of a request."""
        body: dict[str, Any] = {"prompt": prompt, "stream": request.stream}
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
        if request.json_schema is not None:
            body["json_schema"] = request.json_schema
        body.update(request.extensions)
        return body

    def _completion_request(
        self, body: dict[str, Any], call: UpstreamCall, **kwargs: Any
    ) -> HTTPRequest:
        request = HTTPRequest(
            self.base + "/completion",
            method="POST",
            body=json.dumps(body, ensure_ascii=False).encode(),
            headers=JSON_HEADERS,
            connect_timeout=self._settings.upstream_connect_timeout,
            request_timeout=0,  # UpstreamCall keeps the first-byte and idle deadlines
            **kwargs,
        )
        request.upstream_call = call  # type: ignore[attr-defined]
        return request

    def new_call(self) -> UpstreamCall:
        """A handle for one upstream request, armed with the configured timeouts."""
        return UpstreamCall(
            self._settings.upstream_first_byte_timeout, self._settings.upstream_idle_timeout
        )

    async def complete(self, body: dict[str, Any], call: UpstreamCall) -> dict[str, Any]:
        """A non-streamed /completion: llama.cpp's final result object."""

        def on_header(line: str) -> None:
            call.touch()

        request = self._completion_request(body, call, header_callback=on_header)
        try:
            response = await self._fetch(request, call)
            if response.code != 200:
                raise upstream_status_error(response.code, response.body or b"")
            try:
                result = json.loads(response.body)
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
        state = {"status": 0, "final": False}
        error_body = bytearray()
        loads = json.loads

        def on_header(line: str) -> None:
            call.touch()
            if not state["status"] and line.startswith("HTTP/"):
                parts = line.split(" ", 2)
                code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 502
                if code != 100:
                    state["status"] = code
                    if code == 200:
                        on_open()

        def on_chunk(chunk: bytes) -> None:
            call.touch()
            if state["status"] != 200:
                if len(error_body) < ERROR_BODY_LIMIT:
                    error_body.extend(chunk[: ERROR_BODY_LIMIT - len(error_body)])
                return
            events = []
            failure: ProxyError | None = None
            for field, payload in decoder.feed(chunk):
                try:
                    event = loads(payload)
                except ValueError:
                    failure = UpstreamError("llama.cpp sent a malformed stream event")
                    break
                if field == "error" or (
                    isinstance(event, dict) and "error" in event and "content" not in event
                ):
                    failure = _stream_error(event)
                    break
                if not isinstance(event, dict):
                    failure = UpstreamError("llama.cpp sent a stream event that is not an object")
                    break
                if event.get("stop"):
                    state["final"] = True
                events.append(event)
            if events:  # what came before a failure in the same read is delivered first
                on_events(events)
            if failure is not None:
                call.abort(failure)

        request = self._completion_request(
            body, call, header_callback=on_header, streaming_callback=on_chunk
        )
        try:
            response = await self._fetch(request, call)
            if response.code != 200:
                raise upstream_status_error(response.code, bytes(error_body))
            for _field, payload in decoder.close():
                try:
                    event = loads(payload)
                except ValueError:
                    raise UpstreamError("llama.cpp sent a malformed stream event") from None
                if isinstance(event, dict):
                    state["final"] = state["final"] or bool(event.get("stop"))
                    on_events([event])
            if not state["final"]:
                raise UpstreamError("llama.cpp ended the stream before its final event")
        finally:
            call.done()

    async def _fetch(self, request: HTTPRequest, call: UpstreamCall) -> HTTPResponse:
        try:
            response = await self._http.fetch(request, raise_error=False)
        except Exception as exc:
            if call.abort_reason is not None:
                raise call.abort_reason from None
            raise _connection_error(exc, self.base) from exc
        if call.abort_reason is not None:
            raise call.abort_reason
        if response.code == 599:
            raise _connection_error(response.error, self.base)
        return response


def _connection_error(error: BaseException | None, base: str) -> ProxyError:
    if isinstance(error, HTTPTimeoutError):
        if "connect" in str(error).lower():
            return UpstreamTimeout(f"timed out connecting to llama.cpp at {base}")
        return UpstreamTimeout(f"llama.cpp at {base} did not answer in time")
    if isinstance(error, HTTPStreamClosedError):
        return UpstreamError("llama.cpp closed the connection before the response was complete")
    if isinstance(error, socket.gaierror):
        return UpstreamUnavailable(f"cannot resolve llama.cpp's host in {base}")
    if isinstance(error, ConnectionRefusedError):
        return UpstreamUnavailable(f"llama.cpp at {base} refused the connection (is it running?)")
    if isinstance(error, OSError | HTTPClientError):
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
        payload = json.loads(body) if body else None
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
