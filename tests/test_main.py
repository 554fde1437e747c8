"""The server as a process: start-up checks, graceful shutdown, key reload on SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tornado.httpserver import HTTPServer

from llamacpp_proxy.config import ConfigError, Settings, build_parser, load_settings
from llamacpp_proxy.main import main

from .conftest import UNLIMITED_KEY, LoopThread
from .fake_llamacpp import FakeLlamaCpp

ENV_KEYS = {"UNLIMITED_API_KEY": UNLIMITED_KEY}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_server(
    args: list[str], env: dict[str, str], timeout: float = 10
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    return subprocess.run(
        [sys.executable, "-m", "llamacpp_proxy.main", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_defaults_match_the_documented_interface() -> None:
    s = load_settings([], ENV_KEYS)
    assert (s.host, s.port, s.llamacpp_server) == ("0.0.0.0", 8000, ("http://localhost:8080",))
    assert (s.rate_limit_window, s.rate_limit_max_requests) == (60.0, 10)
    assert s.chat_template is None
    help_text = build_parser().format_help()
    for flag in (
        "--host",
        "--port",
        "--llamacpp-server",
        "--chat-template-jinja",
        "--rate-limit-window",
        "--rate-limit-max-requests",
    ):
        assert flag in help_text


def test_keys_never_appear_in_settings_repr() -> None:
    s = load_settings([], {"UNLIMITED_API_KEY": "sk-secret-1", "LIMITED_API_KEY": "sk-secret-2"})
    assert "sk-secret" not in repr(s)


def test_no_key_refuses_to_start_before_binding() -> None:
    port = free_port()
    result = run_server(["--port", str(port), "--host", "127.0.0.1"], {})
    assert result.returncode != 0
    assert "UNLIMITED_API_KEY" in result.stderr and "LIMITED_API_KEY" in result.stderr
    with pytest.raises(ConfigError):
        load_settings([], {})


def test_missing_template_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jinja"
    result = run_server(["--chat-template-jinja", str(missing)], ENV_KEYS)
    assert result.returncode != 0
    assert str(missing) in result.stderr and "does not exist" in result.stderr


def test_template_that_does_not_parse_is_named_with_the_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content }\n")
    result = run_server(["--chat-template-jinja", str(broken)], ENV_KEYS)
    assert result.returncode != 0
    assert str(broken) in result.stderr and "line 2" in result.stderr


def test_bad_upstream_url_and_bad_numbers_are_refused() -> None:
    assert run_server(["--llamacpp-server", "localhost:8080"], ENV_KEYS).returncode != 0
    assert run_server(["--rate-limit-window", "0"], ENV_KEYS).returncode != 0
    assert run_server(["--rate-limit-max-requests", "-1"], ENV_KEYS).returncode != 0


@pytest.fixture
def live_fake(runner: Any, fake: FakeLlamaCpp) -> Iterator[FakeLlamaCpp]:
    runner.call(fake.reset)
    yield fake


class ProxyProcess:
    def __init__(self, upstream: str, extra: list[str] = (), env: dict[str, str] | None = None):  # type: ignore[assignment]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lines: queue.Queue[str] | None = None
        self.seen = ""
        clean = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llamacpp_proxy.main",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--llamacpp-server",
                upstream,
                *extra,
            ],
            env={**clean, **(env if env is not None else ENV_KEYS)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError(self.proc.communicate()[0])

    def read_until(self, text: str, timeout: float = 10) -> str:
        """The log lines up to and including the first one holding `text` (with a deadline)."""
        if self._lines is None:
            self._lines = queue.Queue()
            threading.Thread(target=self._pump, daemon=True).start()
        lines = ""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no log line with {text!r} in:\n{lines}"
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line, f"the process ended without {text!r}:\n{lines}"
            lines += line
            self.seen += line
            if text in line:
                return lines

    def _pump(self) -> None:
        assert self.proc.stdout is not None and self._lines is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put("")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        if self._lines is not None:  # the pump thread owns stdout
            self.proc.wait(timeout=10)
            return self.seen
        return self.proc.communicate(timeout=10)[0]


def test_sigterm_lets_an_in_flight_stream_finish_then_exits_0(live_fake: FakeLlamaCpp) -> None:
    live_fake.script.token_delay = 0.1  # ten tokens: about a second of stream
    proxy = ProxyProcess(live_fake.url, ["--shutdown-timeout", "10"])
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.stream(
            "POST",
            proxy.url + "/v1/chat/completions",
            json=body,
            timeout=10,
            headers={"Authorization": f"Bearer {UNLIMITED_KEY}"},
        ) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proxy.proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert "data: [DONE]" in rest  # the accepted stream was not cut
        assert proxy.proc.wait(timeout=10) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(proxy.url + "/health", timeout=1)
    finally:
        log = proxy.stop()
    assert "shutting down" in log and "stopped" in log


def test_a_second_stop_signal_cuts_the_drain_short(
    runner: LoopThread, live_fake: FakeLlamaCpp
) -> None:
    # An operator who pressed Ctrl-C and will not wait --shutdown-timeout presses it again.
    gate = asyncio.Event()  # the stream holds after its first token until the test ends
    live_fake.script.mid_gate = gate
    proxy = ProxyProcess(live_fake.url, ["--shutdown-timeout", "60"])
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with (
            httpx.Client(timeout=20) as client,
            client.stream(
                "POST",
                proxy.url + "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {UNLIMITED_KEY}"},
            ) as r,
        ):
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proxy.proc.send_signal(signal.SIGINT)
            assert "1 request(s) in flight" in proxy.read_until("shutting down")
            proxy.proc.send_signal(signal.SIGINT)
            proxy.read_until("second stop signal: closing 1 request(s) in flight now")
            rest = list(lines)  # ended, well before the 60 s drain ends, and said why
            assert "data: [DONE]" not in rest
            assert any('"code":"shutting_down"' in line for line in rest), rest
        assert proxy.proc.wait(timeout=10) == 0
        proxy.read_until("stopped")
    finally:
        runner.call(gate.set)
        log = proxy.stop()
    assert "shutdown timeout" not in log


def test_the_shutdown_timeout_ends_a_stream_with_an_error_event_not_a_cut(
    runner: LoopThread, live_fake: FakeLlamaCpp
) -> None:
    # A deploy's restart outlasting a long generation: the client is told the server shut
    # down (the SDK raises that error) instead of reading a truncated stream.
    gate = asyncio.Event()  # the stream holds after its first token until the test ends
    live_fake.script.mid_gate = gate
    proxy = ProxyProcess(live_fake.url, ["--shutdown-timeout", "0.5"])
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=UNLIMITED_KEY, max_retries=0)
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = iter(stream)
        while not next(chunks).choices[0].delta.content:  # the role, then the first token
            pass
        proxy.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shut down before this request finished"):
            for _ in chunks:
                pass
        assert proxy.proc.wait(timeout=10) == 0
        client.close()
    finally:
        runner.call(gate.set)
        log = proxy.stop()
    assert "shutdown timeout: closing 1 request(s) still in flight" in log
    assert "Traceback" not in log


def test_the_shutdown_timeout_answers_waiting_plain_requests_503(
    runner: LoopThread, live_fake: FakeLlamaCpp
) -> None:
    # One request sent to llama.cpp with no answer yet, one queued in the gateway for the
    # server's only slot: each gets a 503 an SDK can retry elsewhere, not a reset.
    gate = asyncio.Event()  # /completion answers nothing until the test ends
    live_fake.script.gate = gate
    live_fake.script.total_slots = 1
    proxy = ProxyProcess(live_fake.url, ["--shutdown-timeout", "0.5"])
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=UNLIMITED_KEY, max_retries=0)
        errors: list[Exception] = []

        def ask() -> None:
            try:
                client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}]
                )
            except Exception as exc:
                errors.append(exc)

        asking = [threading.Thread(target=ask) for _ in range(2)]
        for thread in asking:
            thread.start()
        deadline = time.monotonic() + 10
        # One reached llama.cpp, the other waits in the gateway's queue.
        while not (
            live_fake.requests
            and 'queue_depth{model="default"} 1.0' in httpx.get(proxy.url + "/metrics").text
        ):
            assert time.monotonic() < deadline, "the requests never reached the fake and queue"
            time.sleep(0.01)
        proxy.proc.send_signal(signal.SIGTERM)
        for thread in asking:
            thread.join(timeout=10)
        assert len(errors) == 2, errors
        for error in errors:
            assert isinstance(error, openai.APIStatusError), error
            assert error.status_code == 503
            assert error.response.headers["retry-after"] == "1"
            assert error.body["code"] == "shutting_down"  # type: ignore[index]
        assert proxy.proc.wait(timeout=10) == 0
        client.close()
    finally:
        runner.call(gate.set)
        proxy.stop()


def test_a_credential_in_a_config_file_others_can_read_is_logged_by_name_at_start(
    live_fake: FakeLlamaCpp, tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('metrics-key = "mk-secret-0123456789"\n')
    config.chmod(0o644)
    proxy = ProxyProcess(live_fake.url, ["--config", str(config)])
    try:
        with httpx.Client(timeout=5) as client:  # the key in the file still works
            got = client.get(
                proxy.url + "/metrics", headers={"Authorization": "Bearer mk-secret-0123456789"}
            )
            assert got.status_code == 200
        proxy.read_until("'metrics-key' is a credential in a file other users can read")
    finally:
        log = proxy.stop()
    assert "METRICS_API_KEY" in log and "mk-secret" not in log


def test_sighup_reloads_the_key_file_and_keeps_old_keys_on_error(
    live_fake: FakeLlamaCpp, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.alice]\nkey = "sk-alice-000001"\n')
    proxy = ProxyProcess(live_fake.url, ["--api-keys-file", str(keys)], env={})

    def status(key: str) -> int:
        return httpx.post(
            proxy.url + "/v1/completions",
            json={"prompt": "x"},
            timeout=5,
            headers={"Authorization": f"Bearer {key}"},
        ).status_code

    def wait_for_status(key: str, expected: int) -> bool:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if status(key) == expected:
                return True
            time.sleep(0.05)
        return False

    try:
        assert status("sk-alice-000001") == 200
        assert status("sk-bob-0000002") == 401
        keys.write_text('[keys.bob]\nkey = "sk-bob-0000002"\nrequests = 1\n')
        proxy.proc.send_signal(signal.SIGHUP)
        assert wait_for_status("sk-bob-0000002", 200)
        assert status("sk-alice-000001") == 401
        keys.write_text("this is [not toml")
        proxy.proc.send_signal(signal.SIGHUP)
        assert wait_for_status("sk-bob-0000002", 429)  # still bob, still his limit
    finally:
        log = proxy.stop()
    assert "key reload failed, keeping the previous keys" in log
    assert "sk-alice-000001" not in log and "sk-bob-0000002" not in log


def test_settings_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().port = 1  # type: ignore[misc]


# -- key file: bad bytes and special files (item 18) ----------------------------------------


def test_key_file_that_is_not_utf8_is_a_clean_error(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_bytes(b'[keys.alice]\nkey = "sk-\xff\xfe-alice"\n')
    result = run_server(["--api-keys-file", str(keys)], {})
    assert result.returncode == 2
    assert "error:" in result.stderr and "not UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


def test_key_file_that_is_a_device_is_refused_without_reading_it(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.symlink_to("/dev/zero")
    result = run_server(["--api-keys-file", str(keys)], {})
    assert result.returncode == 2
    assert "not a regular file" in result.stderr and "Traceback" not in result.stderr


def test_key_file_too_large_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text("# padding\n" * 200_000)
    result = run_server(["--api-keys-file", str(keys)], {})
    assert result.returncode == 2 and "larger than" in result.stderr


def test_sighup_with_a_broken_key_file_keeps_the_old_keys_and_logs_one_line(
    live_fake: FakeLlamaCpp, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.alice]\nkey = "sk-alice-000001"\n')
    proxy = ProxyProcess(live_fake.url, ["--api-keys-file", str(keys)], env={})
    try:
        with httpx.Client(base_url=proxy.url, timeout=5) as http:

            def status(key: str) -> int:
                return http.post(
                    "/v1/completions",
                    json={"prompt": "x"},
                    headers={"Authorization": f"Bearer {key}"},
                ).status_code

            keys.write_bytes(b'[keys.bob]\nkey = "sk-\xff-bob-000002"\n')
            proxy.proc.send_signal(signal.SIGHUP)
            first = proxy.read_until("key reload failed")
            keys.unlink()
            keys.symlink_to("/dev/zero")
            proxy.proc.send_signal(signal.SIGHUP)
            second = proxy.read_until("key reload failed")
            assert status("sk-alice-000001") == 200
    finally:
        log = proxy.stop()
    assert "not UTF-8" in first and "not a regular file" in second
    assert "Traceback" not in first + second + log


# -- redis without the redis package (item 21) ----------------------------------------------


def _run_main_in_process(argv: list[str], env: dict[str, str]) -> int:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        return main(argv, env)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_redis_url_without_the_redis_package_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis -> ImportError
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    monkeypatch.delitem(sys.modules, "llamacpp_proxy.guard.ratelimit_redis", raising=False)
    status = _run_main_in_process(
        ["--port", "0", "--host", "127.0.0.1", "--redis-url", "redis://127.0.0.1:1/0"], ENV_KEYS
    )
    err = capsys.readouterr().err
    assert status == 2
    assert "error:" in err and "llamacpp-proxy[redis]" in err
    assert "Traceback" not in err


# -- shutdown that outlasts its timeout (item 20) -------------------------------------------


def test_shutdown_that_outlasts_its_timeout_exits_cleanly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def never_closes(self: Any) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(HTTPServer, "close_all_connections", never_closes)
    port = free_port()

    def stop_when_up() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_up, daemon=True).start()
    status = _run_main_in_process(
        ["--port", str(port), "--host", "127.0.0.1", "--shutdown-timeout", "0.2"], ENV_KEYS
    )
    err = capsys.readouterr().err
    assert status == 0, err
    assert "cannot listen" not in err
    assert "exiting anyway" in err and "stopped" in err  # the closing steps all ran


@pytest.mark.parametrize("entry", ["main", "worker"])
def test_the_start_up_heap_is_frozen_before_serving(
    entry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What start-up built is out of the cyclic collector's reach once serving starts, so a
    full collection at 1,000 open streams walks only what requests made (its pause is the
    longest delay a token sees)."""
    import gc

    from llamacpp_proxy import main as main_module

    frozen_at_serve: list[int] = []

    def run(coro: Any) -> None:
        frozen_at_serve.append(gc.get_freeze_count())
        coro.close()

    bound: list[socket.socket] = []

    def listen(settings: Settings) -> list[socket.socket]:
        bound.extend(listen_sockets(settings))
        return bound

    listen_sockets = main_module.listen_sockets
    monkeypatch.setattr(main_module, "listen_sockets", listen)
    monkeypatch.setattr(asyncio, "run", run)
    args = ["--host", "127.0.0.1", "--port", str(free_port())]
    gc.unfreeze()
    try:
        if entry == "main":
            assert main(args, ENV_KEYS) == 0
        else:
            settings = load_settings(args, ENV_KEYS)
            assert main_module.serve_worker(settings, listen(settings)) == 0
    finally:
        gc.unfreeze()
        for s in bound:
            s.close()
    assert len(frozen_at_serve) == 1 and frozen_at_serve[0] > 10_000
