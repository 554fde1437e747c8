"""Claude Code 2.1.197, headless (`claude -p`), through the gateway to a real llama-server
(SmolLM2-135M-Instruct), behind a limited key of the gateway. docs/agents.md records the
commands and settings these tests use.

Claude Code cannot reach anything but loopback: HTTPS_PROXY/HTTP_PROXY point at a closed
port, NO_PROXY lets only 127.0.0.1 through, nonessential traffic and the autoupdater are
off, and HOME and its config dir are temporary.

The gateway serves two models from an upstreams file, so a model name Claude Code sends
that the settings did not map would be a 404 in the ledger:
- `smollm2`: the real llama-server, tools dropped (`--tools-policy drop`): Claude Code's 24
  tool schemas (about 76 KB) do not fit SmolLM2's 8k context;
- `smollm2-tools`: `tools_policy = "describe"`, through a scripted stand-in for llama.cpp
  that answers the first generation with a described call of Claude Code's `Read` tool and
  forwards every other request to the real llama-server (the tiny model would not choose to
  call a tool itself). Claude Code runs with only `Read`, so its description fits.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from tests.conftest import LIMITED_KEY, UNLIMITED_KEY

from .conftest import (
    CACHE,
    REQUIRED,
    Service,
    child_env,
    console_script,
    http_json,
    llama_server_argv,
    require_llama_files,
    start_service,
)

pytestmark = pytest.mark.e2e

CLAUDE_TIMEOUT = 900  # seconds for one `claude -p` run: a cold 3k-token prompt on 2 busy cores
SECRET = "zebra-4711-quartz"
MAX_TOKENS = 128  # the gateway's --max-tokens-limit, and what Claude Code asks for  # what the file Claude Code reads holds


def claude_bin() -> Path:
    """Claude Code's CLI: CLAUDE_BIN, else where scripts/install-agents puts it."""
    return Path(
        os.environ.get("CLAUDE_BIN") or CACHE / "agents" / "node_modules" / ".bin" / "claude"
    )


class ScriptedLlamaCpp:
    """A llama.cpp stand-in on its own thread: the first /completion is answered with
    `first_reply` (in llama.cpp's streamed events), everything else is forwarded to the real
    server, streamed through as it comes (a forwarded /completion with one more stop
    string, a line break). Records the /completion bodies it received."""

    def __init__(self, upstream: str, first_reply: str) -> None:
        self.upstream = upstream
        self.first_reply = first_reply
        self.completions: list[dict[str, Any]] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scripted-llamacpp", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the scripted llama.cpp did not start")

    def stop(self) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        stand_in = self
        client = tornado.httpclient.AsyncHTTPClient()

        class Forward(tornado.web.RequestHandler):
            async def get(self, path: str) -> None:
                await self._forward(path)

            async def post(self, path: str) -> None:
                if path == "completion":
                    body = json.loads(self.request.body)
                    stand_in.completions.append(body)
                    if len(stand_in.completions) == 1:
                        self._scripted(body)
                        return
                    # The real model's answer ends at its first line break: greedy, the
                    # 135M model sometimes runs on to the cap after the tool result, and
                    # every answer cut makes Claude Code resume, then exit 1.
                    body["stop"] = [*(body.get("stop") or []), "\n"]
                    await self._forward(path, json.dumps(body).encode())
                    return
                await self._forward(path)

            def _scripted(self, body: dict[str, Any]) -> None:
                counts = {"tokens_evaluated": 100, "tokens_predicted": 20}
                if not body.get("stream"):
                    self.finish(
                        {
                            "content": stand_in.first_reply,
                            "stop": True,
                            "stop_type": "eos",
                            **counts,
                        }
                    )
                    return
                self.set_header("Content-Type", "text/event-stream")
                for piece in (stand_in.first_reply[:10], stand_in.first_reply[10:]):
                    event = {"content": piece, "stop": False, **counts}
                    self.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                final = {
                    "content": "",
                    "stop": True,
                    "stop_type": "eos",
                    "stopping_word": "",
                    "timings": {"cache_n": 0},
                    **counts,
                }
                self.finish(b"data: " + json.dumps(final).encode() + b"\n\n")

            async def _forward(self, path: str, body: bytes | None = None) -> None:
                def on_chunk(chunk: bytes) -> None:
                    self.write(chunk)
                    self.flush()

                def on_header(line: str) -> None:
                    if line.startswith("HTTP/"):
                        self.set_status(int(line.split()[1]))
                    elif line.lower().startswith("content-type:"):
                        self.set_header("Content-Type", line.split(":", 1)[1].strip())

                request = tornado.httpclient.HTTPRequest(
                    f"{stand_in.upstream}/{path}",
                    method=self.request.method or "GET",
                    body=body or (self.request.body if self.request.method == "POST" else None),
                    headers={"Content-Type": "application/json"},
                    header_callback=on_header,
                    streaming_callback=on_chunk,
                    request_timeout=CLAUDE_TIMEOUT,
                )
                await client.fetch(request, raise_error=False)
                self.finish()

        app = tornado.web.Application([(r"/(.*)", Forward)])
        [sock] = bind_sockets(0, "127.0.0.1")
        self.port = sock.getsockname()[1]
        server = HTTPServer(app)
        server.add_sockets([sock])
        self._ready.set()
        loop.run_forever()
        server.stop()
        loop.close()


@pytest.fixture(scope="module")
def claude() -> Path:
    binary = claude_bin()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        message = f"Claude Code is not installed at {binary} (scripts/install-agents)"
        if REQUIRED:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return binary


@pytest.fixture(scope="module")
def long_llama_server(request: pytest.FixtureRequest, e2e_logs: Path) -> Iterator[Service]:
    """SmolLM2 with its whole 8k training context in one slot: Claude Code's system prompt
    alone is about 3,000 tokens."""
    binary, model = require_llama_files()

    def argv(port: int) -> list[str]:
        # Greedy: Claude Code sends no temperature, so llama-server's default applies, and
        # a sampled answer may run on past the cap (see the gateway fixture).
        return llama_server_argv(binary, model, port, 1, "-c", "8192", "--temp", "0")

    service = start_service(
        request.config, "llama-server-8k", argv, "/health", e2e_logs, timeout=180
    )
    yield service
    service.stop()


@pytest.fixture(scope="module")
def stand_in(
    long_llama_server: Service, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ScriptedLlamaCpp]:
    note = tmp_path_factory.mktemp("claude-work") / "note.txt"
    note.write_text(f"The secret word is {SECRET}.\n")
    call = {"name": "Read", "arguments": {"file_path": str(note)}}
    reply = f"Let me read the note.\n<tool_call>{json.dumps(call)}</tool_call>"
    scripted = ScriptedLlamaCpp(long_llama_server.url, reply)
    scripted.start()
    yield scripted
    scripted.stop()


@pytest.fixture(scope="module")
def gateway(
    request: pytest.FixtureRequest,
    long_llama_server: Service,
    stand_in: ScriptedLlamaCpp,
    e2e_logs: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Service, Path]]:
    """The gateway: two models (above), the ledger on, the limited key allowed 100
    requests a minute, answers capped at MAX_TOKENS (Claude Code asks for 32000). An answer
    cut by the cap is stop_reason "max_tokens": Claude Code then asks the model to resume,
    three times at most, and exits 1 ("exceeded the 32000 output token maximum") if it is
    cut every time, so the cap must leave the model room to finish."""
    folder = tmp_path_factory.mktemp("claude-gateway")
    upstreams = folder / "upstreams.toml"
    upstreams.write_text(
        f'[models.smollm2]\nservers = ["{long_llama_server.url}"]\n'
        f'[models.smollm2-tools]\nservers = ["{stand_in.url}"]\ntools_policy = "describe"\n'
    )
    ledger = folder / "usage.db"
    env = child_env(UNLIMITED_API_KEY=UNLIMITED_KEY, LIMITED_API_KEY=LIMITED_KEY)

    def argv(port: int) -> list[str]:
        return [
            console_script(),
            "--upstreams-file", str(upstreams),
            "--port", str(port),
            "--host", "127.0.0.1",
            "--tools-policy", "drop",
            "--max-tokens-limit", str(MAX_TOKENS),
            "--rate-limit-max-requests", "100",
            "--rate-limit-window", "60",
            "--usage-db", str(ledger),
            "--shutdown-timeout", "5",
        ]  # fmt: skip

    service = start_service(
        request.config, "proxy-claude-code", argv, "/health/ready", e2e_logs, timeout=30, env=env
    )
    yield service, ledger
    service.stop()


def run_claude(
    claude: Path, gateway: Service, model: str, prompt: str, workdir: Path, *flags: str
) -> subprocess.CompletedProcess[str]:
    """`claude -p PROMPT` against the gateway, with every setting docs/agents.md lists."""
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "ANTHROPIC_BASE_URL": gateway.url,
        "ANTHROPIC_AUTH_TOKEN": LIMITED_KEY,  # sent as Authorization: Bearer
        # Every model Claude Code may ask for, mapped to the gateway's model name.
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
        "ANTHROPIC_SMALL_FAST_MODEL": model,
        # What it asks for as max_tokens (32000 by default): the gateway's cap, so an
        # answer it cuts is reported with the right number.
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(MAX_TOKENS),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        # Nothing leaves loopback: a proxy on a closed port for everything else.
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    # Claude Code's own system prompt (about 3,000 tokens of coding-agent instructions)
    # makes the 135M model ramble past any cap: every answer cut, Claude Code resumes three
    # times and exits 1. A short one lets it finish; the tools and the rest are as sent.
    system = ["--system-prompt", "You are a helpful assistant. Answer in one short sentence."]
    return subprocess.run(
        [str(claude), "-p", prompt, *system, *flags],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLAUDE_TIMEOUT,
    )


def prompt_text(llama_url: str, prompt: str | list[str | int]) -> str:
    """A prompt as text: content that looked like control tokens went as plain-text token
    ids (render/control_tokens.py), which llama-server's /detokenize turns back."""
    if isinstance(prompt, str):
        return prompt
    out: list[str] = []
    ids: list[int] = []
    for piece in [*prompt, ""]:
        if isinstance(piece, int):
            ids.append(piece)
            continue
        if ids:
            out.append(http_json(f"{llama_url}/detokenize", {"tokens": ids})["content"])
            ids = []
        out.append(piece)
    return "".join(out)


def ledger_rows(ledger: Path, since: float, wanted: int) -> list[tuple[Any, ...]]:
    """(key, model, endpoint, status, ttft) of requests that ended after `since`, once at
    least `wanted` are written (the ledger writes in batches), within 30 s."""
    deadline = time.monotonic() + 30
    rows: list[tuple[Any, ...]] = []
    while time.monotonic() < deadline:
        if ledger.exists():
            with sqlite3.connect(ledger) as db:
                rows = db.execute(
                    "SELECT key, model, endpoint, status, ttft FROM usage WHERE time >= ? "
                    "ORDER BY time",
                    (since,),
                ).fetchall()
            if len(rows) >= wanted:
                return rows
        time.sleep(0.2)
    return rows


def assert_served(rows: list[tuple[Any, ...]], model: str) -> None:
    """Every request of the run: Claude Code's streamed /v1/messages, 200, the limited key."""
    assert rows
    for key, served_model, endpoint, status, ttft in rows:
        assert (key, served_model, endpoint, status) == ("limited", model, "/v1/messages", 200)
        assert ttft is not None  # streamed, as Claude Code always asks


def test_plain_prompt(claude: Path, gateway: tuple[Service, Path], tmp_path: Path) -> None:
    service, ledger = gateway
    since = time.time()
    # Without Agent and Skill, Claude Code sends no `role: "system"` message listing its
    # agents and skills after the user's (about 1,500 tokens the tiny model then continues
    # instead of answering); it still sends its 22 other tools (about 60 KB), dropped.
    run = run_claude(
        claude, service, "smollm2", "Say hello.", tmp_path, "--disallowedTools", "Agent", "Skill"
    )
    assert run.returncode == 0, f"stdout: {run.stdout}\nstderr: {run.stderr}"
    assert run.stdout.strip()  # the model's text
    assert_served(ledger_rows(ledger, since, 1), "smollm2")


def test_tool_result_round_trip(
    claude: Path,
    gateway: tuple[Service, Path],
    stand_in: ScriptedLlamaCpp,
    tmp_path: Path,
) -> None:
    service, ledger = gateway
    since = time.time()
    run = run_claude(
        claude,
        service,
        "smollm2-tools",
        "Read note.txt and tell me the secret word.",
        tmp_path,
        "--tools",
        "Read",
        "--allowedTools",
        "Read",
    )
    assert run.returncode == 0, f"stdout: {run.stdout}\nstderr: {run.stderr}"
    assert run.stdout.strip()
    first, second = (prompt_text(stand_in.upstream, c["prompt"]) for c in stand_in.completions[:2])
    # The first generation offered Read in the described format...
    assert "## Read" in first and "<tool_call>" in first
    # ...the scripted call ran, and its real output came back to the model as the result.
    assert '<tool_result name="Read">' in second
    assert SECRET in second
    assert_served(ledger_rows(ledger, since, 2), "smollm2-tools")
