"""Codex CLI (0.171.0), headless (`codex exec`), against the gateway in front of a real
llama-server (SmolLM2-135M-Instruct), behind the gateway's keys.

Codex speaks only the Responses API (`wire_api = "responses"`). It runs with a temporary
CODEX_HOME holding a config.toml whose custom provider points at the gateway (the key comes
through `env_key`), with update checks, analytics and feedback off, and with HTTP(S)_PROXY
set to a closed loopback port so nothing it might try can leave the machine.

Between the gateway and llama-server sits a small scripted upstream: it forwards everything
to llama-server and records what went through, except the first generation that offers
tools, which it answers itself with a call of Codex's `exec_command` tool in the template's
format (the tiny model would not choose to call a tool). Codex runs the command and sends
the result back as a `function_call_output`; that turn is the real model's.

The binary: $CODEX_BIN, else where scripts/install-agents puts it. Missing, the tests skip,
or fail under LLAMACPP_PROXY_REQUIRE_E2E=1.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import tornado.web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from tests.conftest import LoopThread

from .conftest import (
    CACHE,
    Service,
    child_env,
    console_script,
    llama_server_argv,
    require_llama_files,
    start_service,
    unavailable,
)

pytestmark = pytest.mark.e2e

KEY = "sk-codex-e2e-0123456789"
KEY_NAME = "codex"
# The command's output, which is not in the command itself: only running it prints this.
COMMAND = "echo codex-tool-$((6 * 7))"
MARKER = "codex-tool-42"
# Codex's own instructions are about 4,700 tokens; this CPU-only test gives it short ones
# (model_instructions_file), so a prompt takes seconds, not minutes. docs/compatibility.md
# has the settings for Codex's full prompt.
INSTRUCTIONS = "You are a terse assistant. Answer in one short sentence."
CODEX_TIMEOUT = 300  # seconds for one `codex exec` (a few uncached prompts on 2 CPU cores)


def codex_bin() -> Path:
    """Codex CLI: $CODEX_BIN, else scripts/install-agents' install."""
    return Path(os.environ.get("CODEX_BIN") or CACHE / "agents" / "node_modules" / ".bin" / "codex")


@pytest.fixture(scope="module")
def codex() -> Path:
    binary = codex_bin()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        unavailable(
            f"Codex CLI not found at {binary} (scripts/install-agents installs it; or set "
            "CODEX_BIN)"
        )
    return binary


# -- the scripted upstream ------------------------------------------------------------------


@dataclass
class Scripted:
    """What went through the scripted upstream."""

    target: str
    url: str = ""
    prompts: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # forwarded generations' text
    scripted_calls: int = 0


def _events_text(raw: bytes) -> str:
    text = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            text.append(json.loads(line[6:]).get("content") or "")
    return "".join(text)


class _Upstream(tornado.web.RequestHandler):
    def initialize(self, scripted: Scripted) -> None:
        self.scripted = scripted

    async def get(self) -> None:
        await self._forward(None)

    async def post(self) -> None:
        body = self.request.body
        if self.request.path == "/completion":
            payload = json.loads(body)
            prompt = payload.get("prompt")
            text = prompt if isinstance(prompt, str) else json.dumps(prompt)
            self.scripted.prompts.append(text)
            if "<tools>" in text and "<tool_response>" not in text:
                self._tool_call(payload)
                return
        await self._forward(body)

    def _tool_call(self, payload: dict[str, Any]) -> None:
        """A Qwen-format call of Codex's exec_command, as llama.cpp would stream it."""
        self.scripted.scripted_calls += 1
        call = {"name": "exec_command", "arguments": {"cmd": COMMAND}}
        pieces = ["<tool_call>", "\n" + json.dumps(call), "\n</tool_call>"]
        final = {
            "content": "",
            "stop": True,
            "stop_type": "eos",
            "tokens_predicted": len(pieces),
            "tokens_evaluated": 100,
            "timings": {"cache_n": 0},
        }
        if not payload.get("stream"):
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({**final, "content": "".join(pieces)}))
            return
        self.set_header("Content-Type", "text/event-stream")
        for piece in pieces:
            self.write(f"data: {json.dumps({'content': piece, 'stop': False})}\n\n")
        self.finish(f"data: {json.dumps(final)}\n\n")

    async def _forward(self, body: bytes | None) -> None:
        raw = bytearray()

        def on_header(line: str) -> None:
            if line.startswith("HTTP/"):
                self.set_status(int(line.split()[1]))
            elif line.lower().startswith("content-type:"):
                self.set_header("Content-Type", line.split(":", 1)[1].strip())

        def on_chunk(chunk: bytes) -> None:
            raw.extend(chunk)
            self.write(chunk)
            self.flush()

        await AsyncHTTPClient().fetch(
            self.scripted.target + self.request.uri,
            method=self.request.method,
            body=body,
            headers={"Content-Type": "application/json"} if body is not None else None,
            header_callback=on_header,
            streaming_callback=on_chunk,
            raise_error=False,
            request_timeout=CODEX_TIMEOUT,
        )
        if self.request.path == "/completion":
            self.scripted.answers.append(_events_text(bytes(raw)))
        self.finish()


@pytest.fixture(scope="module")
def llama(request: pytest.FixtureRequest, e2e_logs: Path) -> Iterator[Service]:
    """SmolLM2 with one slot of 8192 tokens (its training context): Codex's prompts are long."""
    binary, model = require_llama_files()

    def argv(port: int) -> list[str]:
        return llama_server_argv(binary, model, port, 1, "-c", "8192", "--temp", "0")

    service = start_service(
        request.config, "llama-server-codex", argv, "/health", e2e_logs, timeout=180
    )
    yield service
    service.stop()


@pytest.fixture(scope="module")
def scripted(runner: LoopThread, llama: Service) -> Iterator[Scripted]:
    state = Scripted(target=llama.url)

    async def start() -> HTTPServer:
        app = tornado.web.Application([(r"/.*", _Upstream, {"scripted": state})])
        sockets = bind_sockets(0, "127.0.0.1")
        state.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
        server = HTTPServer(app)
        server.add_sockets(sockets)
        return server

    server = runner.run(start())
    yield state
    runner.call(server.stop)


def _gateway(
    request: pytest.FixtureRequest, e2e_logs: Path, name: str, upstream: str, *extra: str
) -> Service:
    keys = e2e_logs / f"{name}-keys.toml"
    keys.write_text(f'[keys.{KEY_NAME}]\nkey = "{KEY}"\n')
    env = child_env()

    def argv(port: int) -> list[str]:
        return [
            console_script(),
            "--llamacpp-server",
            upstream,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--api-keys-file",
            str(keys),
            "--upstream-idle-timeout",
            str(CODEX_TIMEOUT),  # prompt processing of thousands of tokens on 2 CPU cores
            "--shutdown-timeout",
            "5",
            *extra,
        ]

    return start_service(request.config, name, argv, "/health/ready", e2e_logs, 30, env=env)


@pytest.fixture(scope="module")
def plain_gateway(
    request: pytest.FixtureRequest, e2e_logs: Path, scripted: Scripted
) -> Iterator[Service]:
    """SmolLM2's own ChatML template, which cannot express tools: Codex's are dropped."""
    service = _gateway(
        request, e2e_logs, "proxy-codex-plain", scripted.url, "--tools-policy", "drop"
    )
    yield service
    service.stop()


@pytest.fixture(scope="module")
def tool_gateway(
    request: pytest.FixtureRequest, e2e_logs: Path, scripted: Scripted
) -> Iterator[Service]:
    """The Qwen 2.5 template (tools rendered, calls parsed) in front of the same model."""
    service = _gateway(
        request, e2e_logs, "proxy-codex-tools", scripted.url, "--chat-template-jinja", "qwen2.5"
    )
    yield service
    service.stop()


# -- running codex --------------------------------------------------------------------------


def codex_config(gateway: Service, instructions: Path) -> str:
    """CODEX_HOME/config.toml: a custom provider on the gateway, nothing else switched on."""
    return f"""\
model = "smollm2"
model_provider = "llamacpp_proxy"
model_context_window = 8192
model_instructions_file = "{instructions}"
web_search = "disabled"
check_for_update_on_startup = false

[model_providers.llamacpp_proxy]
name = "llamacpp-proxy"
base_url = "{gateway.url}/v1"
env_key = "LLAMACPP_PROXY_API_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0

[agents]
enabled = false

[features]
goals = false

[analytics]
enabled = false

[feedback]
enabled = false

[otel]
exporter = "none"
"""


@dataclass
class CodexRun:
    returncode: int
    stdout: str
    stderr: str
    last_message: str


def run_codex(codex: Path, gateway: Service, tmp: Path, prompt: str) -> CodexRun:
    """`codex exec PROMPT` against the gateway, isolated in `tmp`, loopback only."""
    home, work = tmp / "codex-home", tmp / "work"
    home.mkdir()
    work.mkdir()
    instructions = tmp / "instructions.md"
    instructions.write_text(INSTRUCTIONS + "\n")
    (home / "config.toml").write_text(codex_config(gateway, instructions))
    last = tmp / "last-message.txt"
    env = {k: v for k, v in child_env().items() if not k.startswith(("OPENAI_", "CODEX_"))}
    env.update(
        CODEX_HOME=str(home),
        HOME=str(tmp),
        LLAMACPP_PROXY_API_KEY=KEY,
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        https_proxy="http://127.0.0.1:9",
        http_proxy="http://127.0.0.1:9",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    argv = [
        str(codex),
        "exec",
        "--strict-config",  # a setting this version does not know is an error, not ignored
        "--skip-git-repo-check",
        "--ephemeral",
        "--sandbox",
        "read-only",
        "--color",
        "never",
        "--output-last-message",
        str(last),
        prompt,
    ]
    done = subprocess.run(
        argv,
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CODEX_TIMEOUT,
    )
    message = last.read_text() if last.is_file() else ""
    return CodexRun(done.returncode, done.stdout, done.stderr, message)


def responses_requests(gateway: Service, status: str = "200") -> float:
    """The gateway's count of /v1/responses requests of the Codex key, from /metrics."""
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("llamacpp_proxy_requests_total{")
            and 'endpoint="/v1/responses"' in line
            and f'key="{KEY_NAME}"' in line
            and f'status="{status}"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _explain(run: CodexRun) -> str:
    return f"codex exited {run.returncode}\nstdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-3000:]}"


def test_plain_prompt(
    codex: Path, plain_gateway: Service, scripted: Scripted, tmp_path: Path
) -> None:
    before = len(scripted.answers)
    run = run_codex(codex, plain_gateway, tmp_path, "Say hello.")
    assert run.returncode == 0, _explain(run)
    assert responses_requests(plain_gateway) >= 1
    answers = scripted.answers[before:]
    assert answers, "no generation reached llama-server"
    # What codex printed as its last message is what the model generated.
    assert run.last_message.strip() == answers[-1].strip(), _explain(run)
    assert run.last_message.strip()
    assert "<tools>" not in scripted.prompts[-1]  # ChatML: Codex's tools were dropped


def test_a_tool_result_comes_back(
    codex: Path, tool_gateway: Service, scripted: Scripted, tmp_path: Path
) -> None:
    calls_before, prompts_before = scripted.scripted_calls, len(scripted.prompts)
    answers_before = len(scripted.answers)
    run = run_codex(codex, tool_gateway, tmp_path, "Run the echo command, then say done.")
    assert run.returncode == 0, _explain(run)
    assert scripted.scripted_calls == calls_before + 1, _explain(run)
    prompts = scripted.prompts[prompts_before:]
    # The turn after the call: Codex ran exec_command and sent its output back, which the
    # template rendered as a tool response; the real model then answered.
    followups = [p for p in prompts if "<tool_response>" in p]
    assert followups, _explain(run)
    assert MARKER in followups[0].split("<tool_response>", 1)[1], followups[0][-2000:]
    assert responses_requests(tool_gateway) >= 2
    assert len(scripted.answers) > answers_before, "the turn after the tool was not the model's"
    assert run.last_message.strip() == scripted.answers[-1].strip(), _explain(run)
