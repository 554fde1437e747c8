"""A raw-socket stand-in for llama.cpp that writes whatever bytes a test scripts: stray
second responses, interim 1xx heads, broken status lines and framing, closes without an
answer. Tornado's server (the fake llama.cpp) cannot be made to misbehave this way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

Respond = Callable[["EvilUpstream", bytes, bytes, asyncio.StreamWriter], Awaitable[bool]]
"""(upstream, request head, request body, writer) -> keep the connection open."""


def completion(content: str, head: bytes = b"HTTP/1.1 200 OK") -> bytes:
    """A well-formed non-streamed /completion answer with Content-Length."""
    body = json.dumps(
        {
            "content": content,
            "stop": True,
            "stop_type": "eos",
            "tokens_predicted": 1,
            "tokens_evaluated": 1,
        }
    ).encode()
    return head + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


def _answer(body: Any) -> bytes:
    data = json.dumps(body).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(data),
        data,
    )


_PROBE_ANSWERS = {
    b"/health": _answer({"status": "ok"}),
    b"/props": _answer({"total_slots": 64, "model_path": "/models/evil.gguf"}),
    b"/slots": _answer([]),
}


class EvilUpstream:
    """Serves each request on 127.0.0.1 with `respond`; records what it received."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.requests: list[tuple[bytes, dict[str, Any] | None]] = []  # (request line, body)
        self.connections = 0
        self.strays = 0  # for tests: bytes sent after a complete response
        self.probes = 0  # /health, /props, /slots requests (the gateway's prober), answered well
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def posts(self) -> int:
        """POST requests received (each one work llama.cpp would have started)."""
        return sum(1 for line, _ in self.requests if line.startswith(b"POST "))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counted = False  # connections that carried a request under test (not a probe)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                raw = await reader.readexactly(length) if length else b""
                line = head.split(b"\r\n")[0]
                if line.split(b" ")[1:2] in ([b"/health"], [b"/props"], [b"/slots"]):
                    # The gateway's health prober: answered well, so that the misbehaviour a
                    # test scripts reaches the request under test, not the prober.
                    self.probes += 1
                    writer.write(_PROBE_ANSWERS[line.split(b" ")[1]])
                    continue
                if not counted:
                    counted = True
                    self.connections += 1
                self.requests.append((line, json.loads(raw) if raw else None))
                if not await self.respond(self, head, raw, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
