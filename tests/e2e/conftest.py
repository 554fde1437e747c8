"""End-to-end fixtures: a real llama-server with SmolLM2-135M-Instruct (a chat model with its
own ChatML template, from /props), and the proxy started as a real process through its console
script, both once per session on free loopback ports; a second pair serves Gemma 3 270M (a
base model, with the proxy's gemma3 template).

Where the binary and the models come from: LLAMA_SERVER_BIN, LLAMA_MODEL (SmolLM2) and
LLAMA_GEMMA_MODEL, else the cache
that scripts/install-llama-server fills. When either is missing the tests are skipped, unless
LLAMACPP_PROXY_REQUIRE_E2E=1 (scripts/test and CI set it): then they fail, so a missing
llama-server can never pass CI silently.

When a test fails, the last lines of both servers' logs are attached to its report.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import openai
import pytest

from tests.conftest import LIMITED_KEY, UNLIMITED_KEY

CACHE = Path(
    os.environ.get("LLAMACPP_PROXY_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamacpp-proxy"
)
REQUIRED = os.environ.get("LLAMACPP_PROXY_REQUIRE_E2E") == "1"
RATE_LIMIT = 2  # --rate-limit-max-requests of the session's proxy (LIMITED_API_KEY)
MODEL = "smollm2-135m-instruct"  # the session proxy's --model-name: what clients send as `model`
GEMMA_MODEL = "gemma-3-270m"
LOOPBACK_ENV = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}

SERVICES = pytest.StashKey[list["Service"]]()


def llama_server_bin() -> Path:
    """The llama-server binary the e2e tests run."""
    return Path(os.environ.get("LLAMA_SERVER_BIN") or CACHE / "bin" / "llama-server")


def llama_model() -> Path:
    """The GGUF model the e2e tests load by default (SmolLM2-135M-Instruct, ChatML)."""
    return Path(
        os.environ.get("LLAMA_MODEL") or CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def gemma_model() -> Path:
    """The second model (Gemma 3 270M, a base model with no template of its own)."""
    return Path(
        os.environ.get("LLAMA_GEMMA_MODEL") or CACHE / "models" / "gemma-3-270m-q4_k_m.gguf"
    )


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it where the e2e suite is required (scripts/test, CI)."""
    if REQUIRED:
        pytest.fail(
            f"{reason}; LLAMACPP_PROXY_REQUIRE_E2E=1 requires the e2e tests to run "
            "(scripts/install-llama-server builds llama-server and the model)",
            pytrace=False,
        )
    pytest.skip(
        f"{reason}; run scripts/install-llama-server, or set LLAMA_SERVER_BIN and LLAMA_MODEL"
    )


def require_llama_files(model: Path | None = None) -> tuple[Path, Path]:
    """The binary and model paths, after checking both exist."""
    binary, model = llama_server_bin(), model or llama_model()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        unavailable(f"llama-server not found at {binary}")
    if not model.is_file():
        unavailable(f"the model is not found at {model}")
    return binary, model


def free_port() -> int:
    """A loopback port nobody listens on right now (a race is handled by retrying)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def llama_server_argv(
    binary: Path, model: Path, port: int, slots: int = 2, *extra: str
) -> list[str]:
    """llama-server on 127.0.0.1:port with `model`, `slots` slots sharing a 2048 context."""
    return [
        str(binary),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-m",
        str(model),
        "-c",
        "2048",
        "-np",
        str(slots),
        "--no-webui",
        *extra,
    ]


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of GET url, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return None


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 60) -> Any:
    """GET (or POST `body` to) url and return the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def console_script(name: str = "llamacpp-proxy-server") -> str:
    """The installed console script, next to this interpreter (venv) or on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        pytest.fail(f"console script {name} is not installed (pip install -e .)", pytrace=False)
    return found


class ServiceFailed(Exception):
    """A server exited or did not get healthy in time."""


class Service:
    """A server process whose output goes to a log file: started, waited for, stopped."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, health_path: str, timeout: float) -> None:
        """Start it and wait until GET health_path answers 200."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # a Ctrl-C to pytest is ours to handle
            )
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServiceFailed(f"{self.name} exited with status {code} while starting")
            if http_status(self.url + health_path) == 200:
                return
            if time.monotonic() > deadline:
                raise ServiceFailed(
                    f"{self.name} was not healthy at {health_path} within {timeout:g}s"
                )
            time.sleep(0.1)

    def tail(self, lines: int = 40) -> str:
        """The last lines of its log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns its exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode


def start_service(
    config: pytest.Config,
    name: str,
    argv_for_port: Callable[[int], list[str]],
    health_path: str,
    log_dir: Path,
    timeout: float,
    env: dict[str, str] | None = None,
) -> Service:
    """Start a server on a free port; retry on a new port if another process took it."""
    log_path = log_dir / f"{name}.log"
    for attempt in range(3):
        port = free_port()
        service = Service(name, argv_for_port(port), port, log_path, env)
        try:
            service.start(health_path, timeout)
        except ServiceFailed as exc:
            service.stop()
            tail = service.tail()
            lost_port_race = "bind" in tail.lower() or "in use" in tail.lower()
            if lost_port_race and attempt < 2:
                continue
            pytest.fail(
                f"{exc}\ncommand: {' '.join(service.argv)}\nlast lines of {log_path}:\n{tail}",
                pytrace=False,
            )
        config.stash.setdefault(SERVICES, []).append(service)
        return service
    raise AssertionError("unreachable")


def start_proxy(
    config: pytest.Config, name: str, options: list[str], log_dir: Path, env: dict[str, str]
) -> Service:
    """The proxy, started through its console script exactly as an operator would, with
    these options, on a free loopback port, ready once /health/ready answers 200 (the
    proxy reaches llama.cpp with its model loaded)."""
    script = console_script()

    def argv(port: int) -> list[str]:
        return [
            script,
            *options,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--shutdown-timeout",
            "5",
        ]

    return start_service(config, name, argv, "/health/ready", log_dir, timeout=30, env=env)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for service in item.config.stash.get(SERVICES, []):
            report.sections.append((f"{service.name} log (last lines)", service.tail()))
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder is an e2e test, even one that forgets its pytestmark."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def e2e_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the servers of this session write their logs."""
    return tmp_path_factory.mktemp("e2e-logs")


@pytest.fixture(scope="session")
def llama_server(request: pytest.FixtureRequest, e2e_logs: Path) -> Iterator[Service]:
    """llama-server with SmolLM2-135M-Instruct (ChatML; /props names <|im_start|> as its BOS
    token, but llama.cpp adds no BOS for it): 2 slots of 1024 tokens, /slots exposed."""
    binary, model = require_llama_files()

    def argv(port: int) -> list[str]:
        return llama_server_argv(binary, model, port, 2, "--slots")

    service = start_service(request.config, "llama-server", argv, "/health", e2e_logs, timeout=180)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def proxy(
    request: pytest.FixtureRequest,
    llama_server: Service,
    e2e_logs: Path,
) -> Iterator[Service]:
    """The proxy, started through its console script exactly as an operator would, with the
    model's own template (/props)."""
    env = child_env(UNLIMITED_API_KEY=UNLIMITED_KEY, LIMITED_API_KEY=LIMITED_KEY)
    options = [
        "--llamacpp-server",
        llama_server.url,
        "--model-name",
        MODEL,
        "--rate-limit-max-requests",
        str(RATE_LIMIT),
        "--rate-limit-window",
        "60",
    ]
    service = start_proxy(request.config, "proxy", options, e2e_logs, env)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def gemma_llama_server(request: pytest.FixtureRequest, e2e_logs: Path) -> Iterator[Service]:
    """llama-server with the Gemma model: 2 slots of 1024 tokens."""
    binary, model = require_llama_files(gemma_model())

    # This GGUF carries no chat template (llama-server would fall back to ChatML): give
    # llama-server's own chat endpoint Gemma 3's, for the prompt comparison.
    template = resources.files("llamacpp_proxy.render") / "chat_templates" / "gemma3.jinja"

    def argv(port: int) -> list[str]:
        return llama_server_argv(binary, model, port, 2, "--chat-template-file", str(template))

    service = start_service(
        request.config, "llama-server-gemma", argv, "/health", e2e_logs, timeout=180
    )
    yield service
    service.stop()


@pytest.fixture(scope="session")
def gemma_proxy(
    request: pytest.FixtureRequest, gemma_llama_server: Service, e2e_logs: Path
) -> Iterator[Service]:
    """A proxy in front of the Gemma server, with the proxy's gemma3 template."""
    env = child_env(UNLIMITED_API_KEY=UNLIMITED_KEY)
    options = ["--llamacpp-server", gemma_llama_server.url, "--chat-template-jinja", "gemma3"]
    service = start_proxy(request.config, "proxy-gemma", options, e2e_logs, env)
    yield service
    service.stop()


EMBED_MODEL = "smollm2-embed"  # the embedding model's name in the upstreams file


@pytest.fixture(scope="session")
def embedding_llama_server(request: pytest.FixtureRequest, e2e_logs: Path) -> Iterator[Service]:
    """llama-server with SmolLM2 computing embeddings (`--embeddings --pooling mean`: one
    576-float vector per input on /v1/embeddings), 2 slots, /slots exposed."""
    binary, model = require_llama_files()

    def argv(port: int) -> list[str]:
        extra = ("--embeddings", "--pooling", "mean", "--slots")
        return llama_server_argv(binary, model, port, 2, *extra)

    service = start_service(
        request.config, "llama-server-embed", argv, "/health", e2e_logs, timeout=180
    )
    yield service
    service.stop()


@pytest.fixture(scope="session")
def embeddings_proxy(
    request: pytest.FixtureRequest,
    llama_server: Service,
    embedding_llama_server: Service,
    e2e_logs: Path,
) -> Iterator[Service]:
    """A proxy whose upstreams file holds the chat model (the session's llama-server) and
    the embedding model (kind = "embedding"), routed by `model`."""
    upstreams = e2e_logs / "embeddings-upstreams.toml"
    upstreams.write_text(
        f'[models."{MODEL}"]\nservers = ["{llama_server.url}"]\n\n'
        f'[models."{EMBED_MODEL}"]\nkind = "embedding"\nservers = ["{embedding_llama_server.url}"]\n'
    )
    env = child_env(UNLIMITED_API_KEY=UNLIMITED_KEY)
    options = ["--upstreams-file", str(upstreams)]
    service = start_proxy(request.config, "proxy-embeddings", options, e2e_logs, env)
    yield service
    service.stop()


def sdk_client(proxy: Service, key: str) -> openai.OpenAI:
    """The official SDK pointed at the proxy; no retries, so a 429 reaches the test."""
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def openai_client(proxy: Service) -> openai.OpenAI:
    """The SDK with the unlimited key."""
    return sdk_client(proxy, UNLIMITED_KEY)


# -- the legacy SDK (openai<1) in its own virtual environment -------------------------------

LEGACY_VENV = CACHE / "venv-openai0"


def _legacy_venv_ok(python: Path) -> bool:
    if not python.is_file():
        return False
    check = "import openai, sys; sys.exit(0 if openai.version.VERSION.startswith('0.') else 1)"
    return (
        subprocess.run([str(python), "-c", check], capture_output=True, timeout=60).returncode == 0
    )


@pytest.fixture(scope="session")
def legacy_openai_python() -> Path:
    """A Python with `openai<1` (the README's legacy style), built once and kept in the cache.

    Only PyPI is needed. A lock keeps two test runs from building it at the same time.
    """
    python = LEGACY_VENV / "bin" / "python"
    LEGACY_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(LEGACY_VENV.with_name(LEGACY_VENV.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _legacy_venv_ok(python):
            return python
        shutil.rmtree(LEGACY_VENV, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(LEGACY_VENV)],
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "openai<1",
            ],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                shutil.rmtree(LEGACY_VENV, ignore_errors=True)
                unavailable(
                    f"cannot build the openai<1 venv: {' '.join(step)} failed:\n"
                    f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
                )
        if not _legacy_venv_ok(python):
            unavailable(f"{LEGACY_VENV} was built but does not import openai 0.x")
        return python


def child_env(**extra: str) -> dict[str, str]:
    """os.environ for a child process: no API keys of ours, loopback never proxied."""
    env = {k: v for k, v in os.environ.items() if k not in ("UNLIMITED_API_KEY", "LIMITED_API_KEY")}
    return {**env, **LOOPBACK_ENV, **extra}
