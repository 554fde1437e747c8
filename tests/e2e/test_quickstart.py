"""scripts/quickstart, the README's first command: it brings up llama-server and the proxy,
prints snippets that work as printed, and stops both on Ctrl-C.

The pip step is skipped (QUICKSTART_SKIP_INSTALL=1, VENV = the environment running these
tests, which has the package and openai) and the cached llama-server is used, so this takes
seconds, not minutes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import child_env, console_script, free_port, require_llama_files

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "quickstart"
READY_TIMEOUT = 180.0


def venv_of_this_python() -> Path:
    """The environment whose bin/ has this python and the proxy's console script."""
    venv = Path(console_script()).parent.parent
    assert (venv / "bin" / "python").exists(), f"no bin/python in {venv}"
    return venv


def gone(pid: int) -> bool:
    """The process no longer runs (a zombie nobody reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def listening(port: int) -> bool:
    """Something accepts connections on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def fenced(text: str, language: str) -> str:
    """The body of the ```language block in text."""
    match = re.search(rf"^```{language}\n(.*?)^```$", text, re.S | re.M)
    assert match, f"no ```{language} block in the quickstart's output:\n{text}"
    return match.group(1)


class Quickstart:
    """scripts/quickstart running with its stdout collected line by line."""

    def __init__(self, env: dict[str, str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        with stderr_path.open("wb") as stderr:
            # SIGINT back to its default: bash cannot trap a signal ignored when it started,
            # and this test may run under a parent that ignores SIGINT (a background job).
            self.process = subprocess.Popen(
                ["bash", str(SCRIPT)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                text=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("Press Ctrl-C"):
                self.ready.set()
        self.ready.set()  # EOF: it exited

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def diagnostics(self) -> str:
        return (
            f"stdout:\n{self.output}\nstderr:\n"
            f"{self.stderr_path.read_text(errors='replace')[-4000:]}"
        )


@pytest.fixture
def quickstart_env(tmp_path: Path) -> dict[str, str]:
    binary, model = require_llama_files()
    return child_env(
        VENV=str(venv_of_this_python()),
        QUICKSTART_SKIP_INSTALL="1",
        LLAMA_SERVER_BIN=str(binary),
        LLAMA_MODEL=str(model),
        LLAMA_PORT=str(free_port()),
        PROXY_PORT=str(free_port()),
        TMPDIR=str(tmp_path),  # its log folder
    )


@pytest.fixture
def quickstart(quickstart_env: dict[str, str], tmp_path: Path) -> Iterator[Quickstart]:
    run = Quickstart(quickstart_env, tmp_path / "quickstart.stderr")
    yield run
    if run.process.poll() is None:  # the test failed before stopping it
        run.process.send_signal(signal.SIGTERM)
        try:
            run.process.wait(30)
        except subprocess.TimeoutExpired:
            run.process.kill()
            run.process.wait()
    for pid in map(int, re.findall(r"pid (\d+)", run.output)):
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_quickstart_serves_the_printed_snippets_and_stops_on_ctrl_c(
    quickstart: Quickstart, quickstart_env: dict[str, str]
) -> None:
    assert quickstart.ready.wait(READY_TIMEOUT), "no ready banner:\n" + quickstart.diagnostics()
    assert quickstart.process.poll() is None, "it exited:\n" + quickstart.diagnostics()
    out = quickstart.output
    proxy_port, llama_port = int(quickstart_env["PROXY_PORT"]), int(quickstart_env["LLAMA_PORT"])
    assert f"ready at http://127.0.0.1:{proxy_port}/v1" in out
    # The quickstart's own smoke test: SmolLM2's answer, printed before the banner.
    smoke = re.search(r"^smollm2-135m-instruct: (.+)$", out, re.M)
    assert smoke and "Paris" in smoke.group(1), out
    proxy_pid = int(re.search(r"proxy: +pid (\d+)", out).group(1))  # type: ignore[union-attr]
    llama_pid = int(re.search(r"llama-server: +pid (\d+)", out).group(1))  # type: ignore[union-attr]

    snippet = fenced(out, "python")
    ran = subprocess.run(
        [sys.executable, "-c", snippet],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip(), "the Python snippet printed no answer"

    if shutil.which("curl"):
        curl = subprocess.run(
            ["bash", "-c", fenced(out, "sh")],
            capture_output=True,
            text=True,
            timeout=120,
            env=child_env(),
        )
        assert curl.returncode == 0, curl.stderr
        assert '"chat.completion"' in curl.stdout, curl.stdout

    quickstart.process.send_signal(signal.SIGINT)
    try:
        status = quickstart.process.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail("quickstart did not stop on SIGINT:\n" + quickstart.diagnostics())
    assert status == 0, quickstart.diagnostics()
    assert gone(proxy_pid), "the proxy still runs after quickstart stopped"
    assert gone(llama_pid), "llama-server still runs after quickstart stopped"
    assert not listening(proxy_port) and not listening(llama_port)
    stderr = quickstart.stderr_path.read_text()
    assert stderr.index("stopping the proxy") < stderr.index("stopping llama-server")


def test_quickstart_refuses_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = child_env(
            VENV=str(tmp_path / "no-venv"),
            QUICKSTART_SKIP_INSTALL="1",
            LLAMA_PORT=str(port),
            PROXY_PORT=str(free_port()),
            TMPDIR=str(tmp_path),
        )
        done = subprocess.run(
            ["bash", str(SCRIPT)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    assert done.returncode != 0
    assert f"port {port} on 127.0.0.1 is in use" in done.stderr
    assert "ready" not in done.stdout
