"""--check: reads what a start would read, reaches every upstream, renders the template with
a sample conversation, and lists every problem (exit 1) or says all is good (exit 0)."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from llamacpp_proxy.main import main

from .conftest import UNLIMITED_KEY, LoopThread
from .fake_llamacpp import FakeLlamaCpp

ENV = {"UNLIMITED_API_KEY": UNLIMITED_KEY}


@pytest.fixture
def upstream(runner: LoopThread, fake: FakeLlamaCpp) -> FakeLlamaCpp:
    runner.call(fake.reset)
    return fake


def check(
    argv: list[str], capsys: pytest.CaptureFixture[str], env: dict[str, str] = ENV
) -> tuple[int, str]:
    status = main(["--check", *argv], env)
    return status, capsys.readouterr().out


def down_server_url(down: str, upstream: FakeLlamaCpp) -> str:
    """A llama-server URL that is `down` ("refused": nothing listens) or "loading"."""
    if down == "loading":
        upstream.script.health_status = 503
        return upstream.url
    return f"http://127.0.0.1:{closed_port()}"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_good_setup_exits_0_and_reports_the_upstream(
    upstream: FakeLlamaCpp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'llamacpp-server = "{upstream.url}"\n')
    status, out = check(["--config", str(config)], capsys)
    assert status == 0, out
    assert f"upstream {upstream.url}: model 'fake-model', 4 slot(s), its own chat template" in out
    assert "the model's template (/props) renders a sample conversation" in out
    assert out.rstrip().endswith("all good")
    # With an operator's template instead of the model's:
    status, out = check(
        ["--llamacpp-server", upstream.url, "--chat-template-jinja", "gemma3"], capsys
    )
    assert status == 0 and "'gemma3' (built in) renders a sample conversation" in out, out


def test_a_model_without_a_template(
    upstream: FakeLlamaCpp, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.script.chat_template = None
    status, out = check(["--llamacpp-server", upstream.url], capsys)
    assert status == 1
    assert "the model has no chat template; give one with --chat-template-jinja" in out


def test_a_template_that_cannot_render(
    upstream: FakeLlamaCpp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ raise_exception('only one turn') }}{% endfor %}")
    status, out = check(
        ["--llamacpp-server", upstream.url, "--chat-template-jinja", str(template)], capsys
    )
    assert status == 1 and "cannot render a sample conversation: only one turn" in out, out
    template.write_text("{% for m in messages %}")
    status, out = check(
        ["--llamacpp-server", upstream.url, "--chat-template-jinja", str(template)], capsys
    )
    assert status == 1 and "does not parse" in out, out


def test_every_problem_is_listed_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text("[keys.alice]\nkey_sha256 = 'short'\n")
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate")
    argv = [
        "--llamacpp-server",
        f"http://127.0.0.1:{closed_port()}",
        "--api-keys-file",
        str(keys),
        "--chat-template-jinja",
        str(tmp_path / "missing.jinja"),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(cert),
        "--upstream-connect-timeout",
        "2",
    ]
    status, out = check(argv, capsys)
    assert status == 1
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert [p.split()[1] for p in problems] == ["keys:", "chat", "TLS:"], out
    assert "key_sha256' must be 64 hex digits" in out
    assert out.rstrip().endswith("3 problem(s), 1 warning(s)")


@pytest.mark.parametrize("down", ["refused", "loading"])
def test_a_llama_server_that_is_down_or_loading_is_a_warning_not_a_problem(
    down: str, upstream: FakeLlamaCpp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The proxy starts without its llama-server and serves it once it answers, so a check
    (and `systemctl reload`, which runs it first: a key rotation) must not fail for it.
    Regression: the check failed, and a reload could not rotate keys during an outage."""
    url = down_server_url(down, upstream)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    argv = ["--llamacpp-server", url, "--chat-template-jinja", str(template)]
    status, out = check([*argv, "--upstream-connect-timeout", "2"], capsys)
    assert status == 0, out
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "once it answers" in warnings[0], out
    assert ("refused the connection" if down == "refused" else "loading") in warnings[0]
    assert "PROBLEM" not in out
    assert out.rstrip().endswith("no problems, 1 warning(s)")


def test_an_https_url_to_a_plain_server_is_a_problem_not_a_server_that_is_down(
    upstream: FakeLlamaCpp, capsys: pytest.CaptureFixture[str]
) -> None:
    """A TLS handshake that fails is a wrong URL (https to a plain llama-server) or a
    certificate the gateway does not trust: no restart of llama.cpp will make it answer.
    Regression: it was a WARNING ('sends it requests once it answers'), exit 0, and the
    proxy started unable to reach its only server."""
    url = upstream.url.replace("http://", "https://")
    status, out = check(["--llamacpp-server", url, "--upstream-connect-timeout", "2"], capsys)
    assert status == 1, out
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 1 and f"upstream {url}" in problems[0], out
    assert "TLS" in problems[0] and "https" in problems[0]
    assert "WARNING" not in out


@pytest.mark.parametrize("resolver", ["no such name", "no answer", "no answer, then no such name"])
def test_an_https_server_whose_name_does_not_resolve_is_down_not_a_tls_problem(
    resolver: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name that does not resolve, or a resolver that does not answer in time, leaves the
    server unknown: the same WARNING as a server that is down, never a TLS problem.
    Regression: the connect timed out in the lookup, the check's reachability test counted
    its own failed lookup as "can't tell" (True), and so reported "it accepts connections,
    but its TLS handshake got no answer" (exit 1). `.invalid` never resolves (RFC 2606),
    and the resolver is the test's own: no lookup leaves the machine."""
    real = asyncio.base_events.BaseEventLoop.getaddrinfo
    lookups: list[str] = []

    async def getaddrinfo(
        loop: asyncio.AbstractEventLoop, host: Any, port: Any, *args: Any, **kwargs: Any
    ) -> Any:
        if not str(host).endswith(".invalid"):
            return await real(loop, host, port, *args, **kwargs)  # type: ignore[arg-type]
        lookups.append(str(host))
        if resolver == "no such name" or (resolver.endswith("no such name") and len(lookups) > 1):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        await asyncio.get_running_loop().create_future()  # no answer: the caller's deadline

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "getaddrinfo", getaddrinfo)
    url = "https://llama.example.invalid:8443"
    status, out = check(["--llamacpp-server", url, "--upstream-connect-timeout", "0.5"], capsys)
    assert status == 0, out
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and f"upstream {url}" in warnings[0], out
    assert "once it answers" in warnings[0] and "TLS" not in warnings[0]
    assert "PROBLEM" not in out
    assert lookups and set(lookups) == {"llama.example.invalid"}


def test_a_resolver_that_never_answers_does_not_hold_the_check_past_its_deadline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """asyncio asks the system resolver in a worker thread, which a deadline cannot stop (a
    nameserver gone: glibc tries for up to 30 s). Regression: asyncio.run, once the check
    was done, waited for that thread, and so did the interpreter at exit: --check (and so
    `systemctl reload`) hung for as long as the resolver did. Here the resolver answers
    only when the test lets it; the check must be over before that. `.invalid` never
    resolves (RFC 2606), and no lookup leaves the machine."""
    real = socket.getaddrinfo
    release = threading.Event()

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not str(host).endswith(".invalid"):
            return real(host, *args, **kwargs)
        release.wait(60)  # a resolver that does not answer
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    url = "https://llama.example.invalid:8443"
    outcome: list[tuple[int, str]] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append(
                check(["--llamacpp-server", url, "--upstream-connect-timeout", "0.5"], capsys)
            )
        finally:
            done.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        assert done.wait(20), "--check still running while the resolver hangs"
    finally:
        release.set()
    status, out = outcome[0]
    assert status == 0, out
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and f"upstream {url}" in warnings[0], out
    assert "TLS" not in warnings[0] and "PROBLEM" not in out


@pytest.mark.parametrize("down", ["refused", "loading"])
def test_the_operators_template_is_checked_while_the_server_is_down(
    down: str, upstream: FakeLlamaCpp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--chat-template-jinja needs no llama-server to be rendered: a template that leaves
    the user's message out is a problem whether or not llama.cpp answers. Regression: with
    the server down or loading, the check warned about the server and never rendered the
    template (exit 0); every request would have been answered from a broken prompt."""
    url = down_server_url(down, upstream)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['role'] }}{% endfor %}")
    argv = ["--llamacpp-server", url, "--chat-template-jinja", str(broken)]
    status, out = check([*argv, "--upstream-connect-timeout", "2"], capsys)
    assert status == 1, out
    assert "leaves the user's message out of the prompt" in out
    assert len([line for line in out.splitlines() if line.startswith("WARNING")]) == 1


def test_a_broken_config_file_or_no_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text("port = 8000\nlisten = 1\n")
    status, out = check(["--config", str(config)], capsys)
    assert status == 1 and f"{config}:2: unknown setting 'listen'" in out
    status, out = check([], capsys, env={})
    assert status == 1 and "no API key is configured" in out


def test_a_mistyped_server_url_is_named_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A scheme typo in a URL that carries credentials: the report (and the journal, where
    # `systemctl reload` puts it) says what is wrong without the password.
    bad = "htp://admin:hunter2-secret@127.0.0.1:8080"
    status, out = check(["--llamacpp-server", bad], capsys)
    assert status == 1 and "must be an http:// or https:// URL" in out
    assert "hunter2-secret" not in out
    status = main(["--llamacpp-server", bad, "--port", "0"], ENV)
    err = capsys.readouterr().err
    assert status == 2 and "must be an http:// or https:// URL" in err
    assert "hunter2-secret" not in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from llamacpp_proxy import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"], {})
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"llamacpp-proxy-server {__version__}"


def test_a_credential_in_a_config_file_others_can_read_is_named_not_shown(
    upstream: FakeLlamaCpp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The deployment guide installs config.toml world-readable (0644): an admin key or a
    # Redis password in it is readable by every local user.
    config = tmp_path / "config.toml"
    config.write_text(
        f'llamacpp-server = "{upstream.url}"\nadmin-key = "ak-secret-0123456789"\n'
        'redis-url = "redis://:rpass-0123456789@127.0.0.1:1/0"\n'
    )
    config.chmod(0o644)
    status, out = check(["--config", str(config)], capsys)
    assert status == 0, out  # a warning: systemctl reload still goes ahead
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 2, out
    assert "'admin-key' is a credential" in warnings[0] and "ADMIN_API_KEY" in warnings[0]
    assert "'redis-url' holds a password" in warnings[1]
    assert "ak-secret" not in out and "rpass" not in out
    config.chmod(0o600)  # readable by its owner alone: nothing to say
    _, out = check(["--config", str(config)], capsys)
    assert "WARNING" not in out
