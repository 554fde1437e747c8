#!/usr/bin/env python3
"""Prototype levers for the proxy's hot path, applied by monkeypatching, to measure a change
before making it in llamacpp_proxy/ (evidence for docs/benchmarks.md; not production code).

    LEVERS=rawpool,orjson python bench/levers.py proxy [llamacpp-proxy-server flags...]
    scripts/bench --levers rawpool,orjson --no-litellm     # the same through the benchmark

Levers (comma-separated in $LEVERS):
  rawpool    keep-alive upstream connections: a minimal pooled HTTP/1.1 client on asyncio
             streams for /completion, streamed and not, instead of SimpleAsyncHTTPClient's
             new TCP connection (plus a resolver round trip through a thread) per request.
             Handles Content-Length bodies only (what the nginx fake sends); llama.cpp streams
             chunked, which a real implementation must decode. No abort/timeouts.
  orjson     orjson for upstream JSON parsing and for chunk/response text encoding.
  batchjson  (with rawpool) parse all the events of one read with one json.loads call.
  resolver   answer IP-literal upstream hosts without the thread-pool getaddrinfo.
  uvloop     uvloop's event loop (needs `pip install uvloop`).
  curl       tornado.curl_httpclient (needs pycurl); non-streamed only: its streaming
             callbacks run after the fetch resolves, which the proxy's stream() rejects.

`rawpool` and `curl` were measured on commit fd27af3, before the proxy had its own kept-alive
upstream client (a21dff4); on later code they replace that client instead of adding to it,
and `orjson` is what the proxy does itself since 4c976d7. They stay as the record of how
those changes were chosen, and as the pattern for the next lever.

Calibration servers (no proxy logic): `levers.py hello PORT` answers canned JSON;
`levers.py relay PORT UPSTREAM` forwards the body to UPSTREAM/completion per request.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tornado.httpserver
import tornado.netutil
import tornado.simple_httpclient
import tornado.web

LEVERS = {x for x in os.environ.get("LEVERS", "").split(",") if x}

if "uvloop" in LEVERS:
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class LiteralResolver(tornado.netutil.Resolver):
    """IP literals resolve to themselves; names go to the default (threaded) resolver."""

    def initialize(self) -> None:
        self._fallback = tornado.netutil.DefaultExecutorResolver()

    async def resolve(self, host: str, port: int, family: int = socket.AF_UNSPEC) -> Any:
        for fam in (socket.AF_INET, socket.AF_INET6):
            try:
                socket.inet_pton(fam, host)
                return [(fam, (host, port) if fam == socket.AF_INET else (host, port, 0, 0))]
            except OSError:
                pass
        return await self._fallback.resolve(host, port, family)


def curl_client_class() -> type:
    from tornado.curl_httpclient import CurlAsyncHTTPClient

    class Curl(CurlAsyncHTTPClient):
        def initialize(
            self,
            max_clients: int = 10,
            defaults: Any = None,  # type: ignore
            max_body_size: Any = None,
        ) -> None:
            super().initialize(max_clients=max_clients, defaults=defaults)

    class Lazy:  # built on first use, inside the running loop
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs, self.client = kwargs, None

        def fetch(self, *args: Any, **kwargs: Any) -> Any:
            if self.client is None:
                self.client = Curl(**self.kwargs)
            return self.client.fetch(*args, **kwargs)

        def close(self) -> None:
            if self.client is not None:
                self.client.close()

    return Lazy


class Pool:
    """Idle keep-alive connections to one upstream host."""

    def __init__(self, base: str) -> None:
        url = urlsplit(base)
        self.host, self.port = url.hostname, url.port or 80
        self.prefix = url.path.rstrip("/").encode()
        self.host_header = f"{self.host}:{self.port}".encode()
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open(
        self, path: bytes, body: bytes
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, int]:
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(
            b"POST %s%s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Accept: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (self.prefix, path, self.host_header, len(body), body)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        low = head.lower()
        i = low.find(b"\r\ncontent-length:")
        if i < 0:
            writer.close()
            raise RuntimeError("levers.rawpool handles Content-Length responses only")
        length = int(low[i + 17 : low.find(b"\r\n", i + 2)])
        return reader, writer, status, length

    def release(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.idle.append((reader, writer))


def patch_proxy() -> None:
    import llamacpp_proxy.frontdoor.openai_response as response
    import llamacpp_proxy.upstream.llamacpp as upstream

    if "resolver" in LEVERS:
        tornado.netutil.Resolver.configure(LiteralResolver)
    if "curl" in LEVERS:
        upstream._AbortableHTTPClient = curl_client_class()  # type: ignore[misc]
    if "orjson" in LEVERS:
        import orjson

        class FastJson:
            loads = staticmethod(orjson.loads)

            @staticmethod
            def dumps(value: Any, **kwargs: Any) -> str:
                return orjson.dumps(value).decode()

        upstream.json = FastJson  # type: ignore[assignment]
        response._dumps = lambda value: orjson.dumps(value).decode()  # type: ignore[assignment]
    if "rawpool" not in LEVERS:
        return
    from llamacpp_proxy.errors import UpstreamError
    from llamacpp_proxy.upstream.sse import SSEDecoder

    original_init = upstream.LlamaCppClient.__init__

    def init(self: Any, settings: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, settings, *args, **kwargs)
        self._pool = Pool(self.base)

    def encode(body: dict[str, Any]) -> bytes:
        if "orjson" in LEVERS:
            import orjson

            return orjson.dumps(body)
        return json.dumps(body, ensure_ascii=False).encode()

    async def complete(self: Any, body: dict[str, Any], call: Any) -> dict[str, Any]:
        try:
            reader, writer, status, length = await self._pool.open(b"/completion", encode(body))
            data = await reader.readexactly(length)
            self._pool.release(reader, writer)
            if status != 200:
                raise upstream.upstream_status_error(status, data)
            return upstream.json.loads(data)  # type: ignore[no-any-return]
        finally:
            call.done()

    async def stream(
        self: Any, body: dict[str, Any], call: Any, on_open: Any, on_events: Any
    ) -> None:
        loads = upstream.json.loads
        batch = "batchjson" in LEVERS
        try:
            reader, writer, status, remaining = await self._pool.open(b"/completion", encode(body))
            if status != 200:
                raise upstream.upstream_status_error(status, await reader.readexactly(remaining))
            on_open()
            decoder = SSEDecoder()
            final = False
            while remaining:
                chunk = await reader.read(min(65536, remaining))
                if not chunk:
                    raise UpstreamError("llama.cpp closed the stream early")
                remaining -= len(chunk)
                payloads = [payload for _field, payload in decoder.feed(chunk)]
                if not payloads:
                    continue
                events = (
                    loads(b"[" + b",".join(payloads) + b"]")
                    if batch
                    else [loads(p) for p in payloads]
                )
                final = final or bool(events[-1].get("stop"))
                on_events(events)
            self._pool.release(reader, writer)
            if not final:
                raise UpstreamError("llama.cpp ended the stream before its final event")
        finally:
            call.done()

    upstream.LlamaCppClient.__init__ = init  # type: ignore[method-assign]
    upstream.LlamaCppClient.complete = complete  # type: ignore[method-assign]
    upstream.LlamaCppClient.stream = stream  # type: ignore[method-assign]


CANNED = (Path(__file__).resolve().parent / "canned" / "oai-chat.json").read_bytes()


class Hello(tornado.web.RequestHandler):
    def post(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(CANNED)

    def get(self) -> None:
        self.finish({"status": "ok"})


class Relay(tornado.web.RequestHandler):
    def initialize(self, client: Any, upstream: str) -> None:
        self.client, self.upstream = client, upstream

    async def post(self) -> None:
        response = await self.client.fetch(
            self.upstream + "/completion",
            method="POST",
            body=self.request.body,
            headers={"Content-Type": "application/json"},
            raise_error=False,
        )
        self.set_header("Content-Type", "application/json")
        self.finish(response.body)


async def calibration(mode: str, port: int, upstream: str) -> None:
    routes: list[Any] = [(r"/health", Hello)]
    if mode == "hello":
        routes.append((r"/v1/chat/completions", Hello))
    else:
        client = tornado.simple_httpclient.SimpleAsyncHTTPClient(
            force_instance=True, max_clients=1024
        )
        routes.append((r"/v1/chat/completions", Relay, {"client": client, "upstream": upstream}))
    server = tornado.httpserver.HTTPServer(tornado.web.Application(routes))
    server.listen(port, "127.0.0.1")
    await asyncio.Event().wait()


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "proxy"
    if mode == "proxy":
        patch_proxy()
        from llamacpp_proxy.main import main as proxy_main

        return proxy_main(sys.argv[2:])
    asyncio.run(calibration(mode, int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
