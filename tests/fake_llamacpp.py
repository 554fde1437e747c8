"""A fake llama.cpp server that speaks the real /completion protocol (b11434), for tests,
the soak script and the benchmark.

It generates from a fixed token script, honours n_predict (stop_type "limit"), stop words
("word", the stop word cut from the text as llama.cpp does), n_probs, grammar and context
errors, and records every body it receives. Faults are switched on per test through
`FakeLlamaCpp.script`: split or merge events across TCP writes, stall, fail with a status,
drop the connection mid-stream, or send malformed events.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.netutil import bind_sockets

DEFAULT_TOKENS = ["Hello", ",", " world", "!", " How", " can", " I", " help", " you", "?"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


SPECIAL = ("<|im_start|>", "<|im_end|>", "<s>", "</s>")
BOS_ID = 1


def count_prompt_tokens(prompt: str | list[str | int], adds_bos: bool = True) -> int:
    """The fake's tokenizer: one token per 4 UTF-8 bytes of text, one per token id, plus
    BOS when the prompt starts with text (llama.cpp's rule for mixed prompts)."""
    if isinstance(prompt, str):
        return math.ceil(len(prompt.encode()) / 4) + adds_bos
    count = sum(math.ceil(len(p.encode()) / 4) if isinstance(p, str) else 1 for p in prompt)
    return count + (adds_bos and bool(prompt) and isinstance(prompt[0], str))


def tokenize(text: str, add_special: bool, parse_special: bool, adds_bos: bool) -> list[int]:
    """The fake's /tokenize: one id per UTF-8 byte (byte + 1000), a special token one id of
    its own when parse_special is on."""
    ids = [BOS_ID] if add_special and adds_bos else []
    i = 0
    while i < len(text):
        special = next((s for s in SPECIAL if parse_special and text.startswith(s, i)), None)
        if special is not None:
            ids.append(10 + SPECIAL.index(special))
            i += len(special)
        else:
            ids.extend(1000 + b for b in text[i].encode())
            i += 1
    return ids


def prompt_text(prompt: str | list[str | int]) -> str:
    """The text a prompt stands for: a mixed prompt's token ids (from the fake's /tokenize)
    decoded back, so tests can check what reached llama.cpp whatever its form."""
    if isinstance(prompt, str):
        return prompt
    out = bytearray()
    for piece in prompt:
        if isinstance(piece, str):
            out += piece.encode()
        elif piece >= 1000:
            out.append(piece - 1000)
        elif 10 <= piece < 10 + len(SPECIAL):
            out += SPECIAL[piece - 10].encode()
    return out.decode()


@dataclass
class Script:
    """How the fake behaves; tests change fields between requests."""

    tokens: list[str] = field(default_factory=lambda: list(DEFAULT_TOKENS))
    n_ctx: int = 4096
    mode: str = "normal"  # normal | split | merge
    stall_before: float = 0.0  # seconds before the response starts
    stall_after_tokens: int | None = None  # stall mid-stream after this many tokens...
    stall_seconds: float = 0.0  # ...for this long
    fail_status: int | None = None  # answer /completion with this status
    fail_body: Any = None
    drop_after_tokens: int | None = None  # close the connection after this many tokens
    malformed_after_tokens: int | None = None  # then send a broken event
    stream_error_after_tokens: int | None = None  # then send llama.cpp's `error:` event
    health_status: int = 200
    chat_template: str | None = CHATML
    token_delay: float = 0.0  # seconds between streamed tokens
    drip_seconds: float = 0.0  # non-streamed: the body goes out 10 bytes at a time, this far apart
    pings: int = 0  # streamed: this many `: ping` comments before the first token...
    ping_interval: float = 0.0  # ...this far apart
    raw_events: list[Any] | None = None  # streamed: send these as `data:` events instead
    huge_body: int = 0  # with fail_status: a body of this many bytes, in 1 MiB writes
    drop_body_after: int | None = None  # non-streamed: send this many body bytes, then close
    health_delay: float = 0.0  # seconds /health takes to answer
    health_gate: asyncio.Event | None = None  # /health waits for it before answering
    fail_prompt: str | None = None  # fail_status only for prompts containing this
    adds_bos: bool = True  # False: like SmolLM2, whose /props still names a bos_token
    total_slots: int = 4  # /props total_slots
    outside_busy: int | None = None  # /slots: this many slots processing (None: no /slots, 404)
    slots_body: bytes | None = None  # /slots: a 200 answer of these bytes instead (a liar)
    slots_gate: asyncio.Event | None = None  # /slots waits for it before answering
    cache_n: int = 0  # final event's timings.cache_n: prompt tokens reused from the cache
    gate: asyncio.Event | None = None  # /completion waits for it before answering
    # /completion with body seed S waits for seed_gates[S] (choice i of n has seed + i):
    # which of a request's choices opens first, made certain
    seed_gates: dict[int, asyncio.Event] = field(default_factory=dict)
    mid_gate: asyncio.Event | None = None  # a stream waits for it after its first token
    head_gate: asyncio.Event | None = None  # a stream sends its head, then waits for it
    model_alias: str | None = None  # llama-server --alias; None: the model's path, as llama.cpp
    # /v1/embeddings, as llama-server answers it started with --embeddings --pooling mean:
    embeddings: bool = True  # False: as without --embeddings (501 not_supported_error)
    embedding_size: int = 8  # the model's width (SmolLM2's is 576)
    n_batch: int = 512  # an input over this many tokens is refused (llama-server -b/-ub)
    embeddings_answer: Any = None  # a 200 answer sent as is (bytes or JSON) instead


class _Base(tornado.web.RequestHandler):
    def initialize(self, fake: FakeLlamaCpp) -> None:
        self.fake = fake

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")

    def send_json(self, value: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(value))


class _Completion(_Base):
    _active = False  # the generation runs (post() to the final event, or the answer's end)

    async def post(self) -> None:
        fake = self.fake
        fake.active += 1
        fake.peak_active = max(fake.peak_active, fake.active)
        self._active = True
        try:
            await self._post()
        finally:
            self._generation_ended()

    def _generation_ended(self) -> None:
        """The generation is over: at its final event for a stream (llama.cpp frees the
        slot as it sends it, and the gateway ends the stream there, closing the connection
        without waiting for the terminating chunk), else when the answer is written."""
        if self._active:
            self._active = False
            self.fake.active -= 1

    async def _post(self) -> None:
        fake = self.fake
        script = fake.script
        body = json.loads(self.request.body)
        fake.requests.append(body)
        await self._answer(fake, script, body)

    async def _answer(self, fake: FakeLlamaCpp, script: Script, body: dict[str, Any]) -> None:
        if script.stall_before:
            await asyncio.sleep(script.stall_before)
        if script.gate is not None:
            await script.gate.wait()
        seed_gate = script.seed_gates.get(body.get("seed"))  # type: ignore[arg-type]
        if seed_gate is not None:
            await seed_gate.wait()
        if fake.close_connections:
            self.set_header("Connection", "close")
        if script.fail_status is not None and script.huge_body:
            await self._huge_body(script)
            return
        if script.fail_status is not None and (
            script.fail_prompt is None or script.fail_prompt in str(body.get("prompt"))
        ):
            payload = (
                script.fail_body
                if script.fail_body is not None
                else {
                    "error": {
                        "code": script.fail_status,
                        "message": "fake failure",
                        "type": "server_error",
                    }
                }
            )
            self.set_status(script.fail_status)
            self.finish(payload if isinstance(payload, bytes | str) else json.dumps(payload))
            return
        grammar = body.get("grammar")
        if grammar is not None and "::=" not in grammar:
            self.send_json(
                {
                    "error": {
                        "code": 400,
                        "message": "Failed to parse grammar",
                        "type": "invalid_request_error",
                    }
                },
                400,
            )
            return
        prompt = body.get("prompt", "")
        n_prompt = count_prompt_tokens(prompt, script.adds_bos)
        if n_prompt > script.n_ctx:
            self.send_json(
                {
                    "error": {
                        "code": 400,
                        "type": "exceed_context_size_error",
                        "n_prompt_tokens": n_prompt,
                        "n_ctx": script.n_ctx,
                        "message": f"request ({n_prompt} tokens) exceeds the available context "
                        "size "
                        f"({script.n_ctx} tokens), try increasing it",
                    }
                },
                400,
            )
            return
        pieces, stop_type, stopping_word = self._generate(body, script)
        final = {
            "content": "",
            "stop": True,
            "stop_type": stop_type,
            "stopping_word": stopping_word,
            "tokens_predicted": len(pieces),
            "tokens_evaluated": n_prompt,
            "truncated": False,
            "model": "fake-model.gguf",
            "timings": {"predicted_n": len(pieces), "cache_n": script.cache_n},
        }
        if not body.get("stream"):
            result = dict(final, content="".join(pieces))
            if body.get("n_probs"):
                result["completion_probabilities"] = [self._probs(p, body) for p in pieces]
            if script.drip_seconds or script.drop_body_after is not None:
                await self._slow_body(json.dumps(result).encode(), script)
                return
            self.send_json(result)
            return
        await self._stream(body, script, pieces, final, n_prompt)

    async def _huge_body(self, script: Script) -> None:
        """A fail_status answer whose body is huge: how much of it the proxy takes."""
        self.set_status(script.fail_status or 500)
        block = b"x" * (1 << 20)
        try:
            for start in range(0, script.huge_body, len(block)):
                piece = block[: min(len(block), script.huge_body - start)]
                self.write(piece)
                await self.flush()
                self.fake.body_bytes_sent += len(piece)
            self.finish()
        except StreamClosedError:
            self.fake.client_disconnects += 1
            self.fake.disconnected.set()

    async def _slow_body(self, data: bytes, script: Script) -> None:
        """A non-streamed answer that trickles out, or breaks off after drop_body_after."""
        self.set_header("Content-Length", str(len(data)))
        stream = self.request.connection.stream  # type: ignore[attr-defined]
        if script.drop_body_after is not None:
            self.write(data[: script.drop_body_after])
            await self.flush()
            stream.close()
            return
        try:
            for start in range(0, len(data), 10):
                self.write(data[start : start + 10])
                await self.flush()
                await asyncio.sleep(script.drip_seconds)
            self.finish()
        except StreamClosedError:
            self.fake.client_disconnects += 1
            self.fake.disconnected.set()

    def _generate(self, body: dict[str, Any], script: Script) -> tuple[list[str], str, str]:
        n_predict = body.get("n_predict", -1)
        stops = body.get("stop") or []
        pieces: list[str] = []
        text = ""
        for token in script.tokens:
            if n_predict is not None and 0 <= n_predict <= len(pieces):
                return pieces, "limit", ""
            if not stops:
                pieces.append(token)
                continue
            candidate = text + token
            for stop in stops:
                at = candidate.find(stop)
                if at >= 0:
                    kept = candidate[len(text) : at]
                    if kept:
                        pieces.append(kept)
                    return pieces, "word", stop
            pieces.append(token)
            text = candidate
        return pieces, "eos", ""

    def _probs(self, token: str, body: dict[str, Any]) -> dict[str, Any]:
        k = int(body["n_probs"])
        alts = [
            {
                "id": i,
                "token": token if i == 0 else f"alt{i}",
                "bytes": list((token if i == 0 else f"alt{i}").encode()),
                "logprob": -0.1 * (i + 1),
            }
            for i in range(k)
        ]
        return {
            "id": 0,
            "token": token,
            "bytes": list(token.encode()),
            "logprob": -0.1,
            "top_logprobs": alts,
        }

    async def _stream(
        self,
        body: dict[str, Any],
        script: Script,
        pieces: list[str],
        final: dict[str, Any],
        n_prompt: int,
    ) -> None:
        self.set_header("Content-Type", "text/event-stream")
        frames: list[bytes] = []
        for i, piece in enumerate(pieces):
            event: dict[str, Any] = {
                "content": piece,
                "tokens": [i],
                "stop": False,
                "id_slot": 0,
                "tokens_predicted": i + 1,
                "tokens_evaluated": n_prompt,
            }
            if body.get("n_probs"):
                event["completion_probabilities"] = [self._probs(piece, body)]
            frames.append(b"data: " + json.dumps(event).encode() + b"\n\n")
        frames.append(b"data: " + json.dumps(final).encode() + b"\n\n")
        if script.raw_events is not None:
            frames = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in script.raw_events]
        try:
            if script.head_gate is not None:  # llama.cpp answered 200; the first token is slow
                await self.flush()
                await script.head_gate.wait()
            for _ in range(script.pings):
                self.write(b": ping\n\n")
                await self.flush()
                await asyncio.sleep(script.ping_interval)
            if script.mode == "merge":
                if script.raw_events is None:
                    self._generation_ended()  # the final event goes out with this write
                self.write(b"".join(frames))
                await self.flush()
                self.finish()
                return
            for i, frame in enumerate(frames):
                if script.drop_after_tokens is not None and i == script.drop_after_tokens:
                    await self.flush()
                    self.request.connection.stream.close()  # type: ignore[attr-defined]
                    return
                if script.malformed_after_tokens is not None and i == script.malformed_after_tokens:
                    self.write(b'data: {"content": "broken\n\n')
                    await self.flush()
                    self.finish()
                    return
                if script.stream_error_after_tokens == i:
                    self.write(
                        b'error: {"error": {"code": 500, "message": "fake stream error", '
                        b'"type": "server_error"}}\n\n'
                    )
                    await self.flush()
                    self.finish()
                    return
                if script.mid_gate is not None and i == 1:
                    await script.mid_gate.wait()
                if script.stall_after_tokens is not None and i == script.stall_after_tokens:
                    await asyncio.sleep(script.stall_seconds)
                if i == len(frames) - 1 and script.raw_events is None:
                    # Before the write: the gateway may read the final event and start its
                    # next request before this coroutine resumes from the flush.
                    self._generation_ended()
                if script.mode == "split":
                    cut = len(frame) // 2
                    self.write(frame[:cut])
                    await self.flush()
                    await asyncio.sleep(0.002)
                    self.write(frame[cut:])
                else:
                    self.write(frame)
                await self.flush()
                self.fake.events_sent += 1
                if script.token_delay:
                    await asyncio.sleep(script.token_delay)
            self.finish()
        except StreamClosedError:
            self._client_left()

    def on_connection_close(self) -> None:
        self._client_left()

    def _client_left(self) -> None:
        # Only before the answer was whole: the gateway closes a stream's connection once
        # its final event is in, which is no disconnect of a client that left.
        if self._active:
            self.fake.client_disconnects += 1
            self.fake.disconnected.set()


def embedding_of(item: str | list[int], size: int) -> list[float]:
    """The fake's embedding of one input: a unit vector that depends on every byte (or
    token id), so equal inputs have equal vectors and different ones different vectors."""
    values = list(item.encode()) if isinstance(item, str) else item
    vector = [0.0] * size
    for position, value in enumerate(values):
        vector[(value + position) % size] += 1.0 + (value % 7) / 7
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    # Rounded through float32, as llama.cpp computes them.
    return [struct.unpack("<f", struct.pack("<f", v / norm))[0] for v in vector]


class _Embeddings(_Base):
    """POST /v1/embeddings (b11434's OpenAI-shaped answer: model, object, usage, data)."""

    async def post(self) -> None:
        fake = self.fake
        fake.active += 1
        fake.peak_active = max(fake.peak_active, fake.active)
        try:
            await self._post()
        finally:
            fake.active -= 1

    def on_connection_close(self) -> None:
        self.fake.client_disconnects += 1
        self.fake.disconnected.set()

    def _error(self, status: int, message: str, kind: str) -> None:
        self.send_json({"error": {"code": status, "message": message, "type": kind}}, status)

    async def _post(self) -> None:
        fake, script = self.fake, self.fake.script
        body = json.loads(self.request.body)
        fake.embedding_requests.append(body)
        if script.stall_before:
            await asyncio.sleep(script.stall_before)
        if script.gate is not None:
            await script.gate.wait()
        if not script.embeddings:
            message = "This server does not support embeddings. Start it with `--embeddings`"
            self._error(501, message, "not_supported_error")
            return
        if script.fail_status is not None:
            payload = script.fail_body or {
                "error": {"code": script.fail_status, "message": "fake failure", "type": "x"}
            }
            self.set_status(script.fail_status)
            self.finish(payload if isinstance(payload, bytes | str) else json.dumps(payload))
            return
        if script.embeddings_answer is not None:
            answer = script.embeddings_answer
            self.finish(answer if isinstance(answer, bytes) else json.dumps(answer))
            return
        inputs = body.get("input", body.get("content"))
        if inputs is None:
            self._error(400, '"input" or "content" must be provided', "invalid_request_error")
            return
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not inputs:
            self._error(400, '"input" must not be empty', "invalid_request_error")
            return
        data, total = [], 0
        for index, item in enumerate(inputs):
            if not item:
                self._error(400, "Input content cannot be empty", "invalid_request_error")
                return
            tokens = (
                count_prompt_tokens(item, script.adds_bos) if isinstance(item, str) else len(item)
            )
            if tokens > script.n_batch:
                self._error(
                    500,
                    f"input ({tokens} tokens) is too large to process. increase the physical "
                    f"batch size (current batch size: {script.n_batch})",
                    "server_error",
                )
                return
            total += tokens
            vector = embedding_of(item, script.embedding_size)
            embedding: Any = vector
            if body.get("encoding_format") == "base64":
                raw = struct.pack(f"<{len(vector)}f", *vector)
                embedding = base64.b64encode(raw).decode()
            data.append({"embedding": embedding, "index": index, "object": "embedding"})
        self.send_json(
            {
                "model": body.get("model") or "/models/fake-model.gguf",
                "object": "list",
                "usage": {"prompt_tokens": total, "total_tokens": total},
                "data": data,
            }
        )


class _Props(_Base):
    def get(self) -> None:
        self.fake.props_requests += 1
        # As llama.cpp: started with -m PATH and no --alias, the alias is PATH itself.
        alias = self.fake.script.model_alias or "/models/fake-model.gguf"
        props: dict[str, Any] = {
            "model_alias": alias,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "total_slots": self.fake.script.total_slots,
            "model_path": "/models/fake-model.gguf",
            "default_generation_settings": {"n_ctx": self.fake.script.n_ctx},
        }
        if self.fake.script.chat_template is not None:
            props["chat_template"] = self.fake.script.chat_template
        self.send_json(props)


class _Slots(_Base):
    async def get(self) -> None:
        """As llama-server with --slots: one entry per slot, the first `outside_busy` of
        them processing (work the gateway did not send, in the tests that set it)."""
        script = self.fake.script
        self.fake.slots_reads += 1
        if script.slots_gate is not None:
            await script.slots_gate.wait()
        if script.slots_body is not None:
            self.set_header("Content-Type", "application/json")
            self.finish(script.slots_body)
            return
        if script.outside_busy is None:
            # A 404, as before /slots was faked (the gateway then stops asking): Tornado
            # logs a 5xx answer at ERROR, which tests that assert a clean log would see.
            self.send_json(
                {"error": {"code": 404, "message": "This server does not support slots"}}, 404
            )
            return
        slots = [
            {"id": i, "is_processing": i < script.outside_busy} for i in range(script.total_slots)
        ]
        self.send_json(slots)


class _Tokenize(_Base):
    def post(self) -> None:
        body = json.loads(self.request.body)
        self.fake.tokenize_requests.append(body)
        tokens = tokenize(
            body["content"],
            bool(body.get("add_special", False)),
            bool(body.get("parse_special", True)),
            self.fake.script.adds_bos,
        )
        self.send_json({"tokens": tokens})


class _Health(_Base):
    async def get(self) -> None:
        fake = self.fake
        fake.health_requests += 1
        fake.health_active += 1
        fake.max_health_active = max(fake.max_health_active, fake.health_active)
        try:
            if fake.script.health_delay:
                await asyncio.sleep(fake.script.health_delay)
            if fake.script.health_gate is not None:
                await fake.script.health_gate.wait()
        finally:
            fake.health_active -= 1
        status = self.fake.script.health_status
        if status == 200:
            self.send_json({"status": "ok"})
        else:
            self.send_json(
                {
                    "error": {
                        "code": status,
                        "message": "Loading model",
                        "type": "unavailable_error",
                    }
                },
                status,
            )


class _Models(_Base):
    def get(self) -> None:
        self.send_json(
            {
                "object": "list",
                "data": [
                    {
                        "id": "/models/fake-model.gguf",  # as llama.cpp: the -m path
                        "object": "model",
                        "created": 1700000000,
                        "owned_by": "llamacpp",
                    }
                ],
            }
        )


class FakeLlamaCpp:
    """The fake server; start() on the running loop, `url` once started."""

    def __init__(self) -> None:
        self.script = Script()
        self.requests: list[dict[str, Any]] = []
        self.slots_reads = 0  # GET /slots (the gateway's prober and its re-reads)
        self.tokenize_requests: list[dict[str, Any]] = []
        self.embedding_requests: list[dict[str, Any]] = []
        self.client_disconnects = 0
        self.disconnected = asyncio.Event()
        self.close_connections = False  # answer with Connection: close
        self.events_sent = 0  # streamed events the fake's socket accepted
        self.active = 0  # /completion requests being answered now
        self.peak_active = 0  # the most answered at once
        self.health_requests = 0
        self.health_active = 0
        self.max_health_active = 0
        self.body_bytes_sent = 0  # of a huge_body answer
        self.props_requests = 0
        self.port = 0
        self._server: HTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> None:
        """Listen on a free loopback port (or the one given)."""
        app = tornado.web.Application(
            [
                (r"/completion", _Completion, {"fake": self}),
                (r"/completions", _Completion, {"fake": self}),
                (r"/props", _Props, {"fake": self}),
                (r"/tokenize", _Tokenize, {"fake": self}),
                (r"/slots", _Slots, {"fake": self}),
                (r"/health", _Health, {"fake": self}),
                (r"/v1/models", _Models, {"fake": self}),
                (r"/v1/embeddings", _Embeddings, {"fake": self}),
            ]
        )
        sockets = bind_sockets(port, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        self._server = HTTPServer(app)
        self._server.add_sockets(sockets)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    async def kill(self) -> None:
        """Stop listening and drop every connection, as a crashed llama-server would."""
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()

    def reset(self) -> None:
        """Forget recorded requests and restore the default script."""
        self.script = Script()
        self.requests.clear()
        self.tokenize_requests.clear()
        self.embedding_requests.clear()
        self.client_disconnects = 0
        self.disconnected.clear()
        self.close_connections = False
        self.events_sent = 0
        # `active` and `health_active` count work in progress, not history: zeroing them
        # under a request still being answered would drive them negative when it ends.
        self.peak_active = self.active
        self.health_requests = 0
        self.max_health_active = self.health_active
        self.body_bytes_sent = 0
        self.props_requests = 0
        self.slots_reads = 0


def main() -> None:
    """Run the fake on its own (for scripts/soak and manual checks): PORT as first argument."""
    import sys

    async def run() -> None:
        fake = FakeLlamaCpp()
        fake.start(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
        print(fake.url, flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
