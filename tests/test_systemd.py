"""The systemd units in deploy/systemd: systemd accepts them, the proxy accepts its ExecStart
command line, no key is in a unit, and the sandboxing the deployment doc promises is there.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from llamacpp_proxy.config import build_parser, load_settings
from llamacpp_proxy.render.templates import load_chat_template

UNITS = Path(__file__).resolve().parents[1] / "deploy" / "systemd"
PROXY_UNIT = UNITS / "llamacpp-proxy.service"
LLAMA_UNIT = UNITS / "llama-server.service"
KEYS_EXAMPLE = UNITS / "keys.env.example"
CONFIG = UNITS / "config.toml"
INSTALLED_CONFIG = "/etc/llamacpp-proxy/config.toml"  # where the unit reads CONFIG from


def directives(unit: Path) -> dict[str, list[str]]:
    """`Section.Key` -> values, read as systemd does: comments dropped, a trailing backslash
    continues the line (the backslash becoming a space)."""
    found: dict[str, list[str]] = {}
    section, pending = "", ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line.startswith(("#", ";")) or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{unit.name}: not a directive: {line!r}"
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def exec_argv(unit: Path, key: str = "ExecStart", index: int = 0) -> list[str]:
    """The unit's command line, split as systemd splits it (no specifiers or $ variables
    are used in it, so shell-style splitting is exact)."""
    value = directives(unit)[f"Service.{key}"][index]
    command = value.lstrip("-@:+!")
    assert "%" not in command and "$" not in command, command
    return shlex.split(command)


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        message = "systemd-analyze is missing (Debian package systemd)"
        if os.environ.get("LLAMACPP_PROXY_REQUIRE_E2E") == "1":
            pytest.fail(message + "; LLAMACPP_PROXY_REQUIRE_E2E=1 requires this check")
        pytest.skip(message)
    # verify fails a unit whose ExecStart binary does not exist, and /opt/llamacpp-proxy or
    # /var/cache/llamacpp-proxy are not installed here: check copies whose missing commands
    # point at stand-in executables in a temp folder, everything else unchanged.
    stubs = tmp_path / "bin"
    stubs.mkdir()
    copies = []
    for unit in (PROXY_UNIT, LLAMA_UNIT):
        text = unit.read_text()
        for key, values in directives(unit).items():
            if not key.startswith("Service.Exec"):
                continue
            for value in values:
                command = shlex.split(value.lstrip("-@:+!"))[0]
                if not os.access(command, os.X_OK):
                    stub = stubs / Path(command).name
                    stub.write_text("#!/bin/sh\nexit 0\n")
                    stub.chmod(0o755)
                    text = text.replace(command, str(stub))
        copy = tmp_path / unit.name
        copy.write_text(text)
        copies.append(copy)

    done = subprocess.run(
        [tool, "verify", "--man=no", *map(str, copies)], capture_output=True, text=True, timeout=120
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # Unknown or misspelt directives are only warnings: none may name our units.
    about_ours = [
        line
        for line in output.splitlines()
        if any(unit.name in line for unit in (PROXY_UNIT, LLAMA_UNIT))
    ]
    assert about_ours == [], output


def shipped_config(argv: list[str]) -> list[str]:
    """argv reading deploy/systemd/config.toml where the unit reads its installed copy."""
    assert argv[argv.index("--config") + 1] == INSTALLED_CONFIG
    return [str(CONFIG) if arg == INSTALLED_CONFIG else arg for arg in argv]


def test_proxy_exec_start_is_accepted_by_the_proxy() -> None:
    argv = shipped_config(exec_argv(PROXY_UNIT))
    assert Path(argv[0]).name == "llamacpp-proxy-server"
    build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown flag
    settings = load_settings(argv[1:], {"UNLIMITED_API_KEY": "x"})
    assert settings.host == "127.0.0.1"
    assert settings.chat_template is not None
    load_chat_template(settings.chat_template)

    # The proxy talks to the llama-server of the example unit.
    llama = exec_argv(LLAMA_UNIT)
    llama_port = llama[llama.index("--port") + 1]
    assert settings.llamacpp_server == (f"http://127.0.0.1:{llama_port}",)

    # systemd must not SIGKILL the proxy while it drains: its drain is --shutdown-timeout
    # plus up to 5 s to close the remaining connections.
    (stop_timeout,) = directives(PROXY_UNIT)["Service.TimeoutStopSec"]
    assert float(stop_timeout) > settings.shutdown_timeout + 5


def test_units_hold_no_key_material() -> None:
    for unit in (PROXY_UNIT, LLAMA_UNIT):
        text = unit.read_text()
        assert "API_KEY=" not in text, f"{unit.name} must not contain keys"
        assert not re.search(r"\bsk-[A-Za-z0-9_-]{8,}", text), f"{unit.name} holds a key"
        for value in directives(unit).get("Service.Environment", []):
            assert "KEY" not in value.upper(), value
    assert directives(PROXY_UNIT)["Service.EnvironmentFile"] == ["/etc/llamacpp-proxy/keys.env"]


def test_keys_example_has_only_placeholders() -> None:
    text = KEYS_EXAMPLE.read_text()
    assert "install -m 0600" in text
    values = dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert set(values) == {"UNLIMITED_API_KEY", "LIMITED_API_KEY"}
    assert all(value.startswith("replace-me") for value in values.values()), values


@pytest.mark.parametrize("unit", [PROXY_UNIT, LLAMA_UNIT], ids=lambda unit: unit.stem)
def test_units_are_sandboxed_and_restart_on_failure(unit: Path) -> None:
    found = directives(unit)
    expected = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes",
        "LockPersonality": "yes",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
    }
    for key, value in expected.items():
        assert found.get(f"Service.{key}") == [value], f"{unit.name}: {key}={value} expected"
    assert "@system-service" in found["Service.SystemCallFilter"]


def test_proxy_unit_orders_after_llama_server_and_reloads_with_sighup() -> None:
    found = directives(PROXY_UNIT)
    assert "llama-server.service" in found["Unit.After"][0].split()
    assert found["Unit.Wants"] == ["llama-server.service"]
    # --check first (same config): a broken edit fails the reload and is never sent SIGHUP.
    check = exec_argv(PROXY_UNIT, "ExecReload", 0)
    assert check == [exec_argv(PROXY_UNIT)[0], "--check", *exec_argv(PROXY_UNIT)[1:]]
    assert found["Service.ExecReload"][1] == "/bin/kill -HUP $MAINPID"


def test_proxy_unit_sets_a_descriptor_limit_that_holds_its_connection_cap() -> None:
    """Item 14: the unit set no LimitNOFILE, so 1,100 idle clients exhausted 1,024 fds."""
    found = directives(PROXY_UNIT)
    nofile = int(found["Service.LimitNOFILE"][0])
    argv = shipped_config(exec_argv(PROXY_UNIT))
    cap = load_settings(argv[1:], {"UNLIMITED_API_KEY": "x"}).max_connections
    assert nofile >= 2 * cap + 64  # what main.connection_cap needs to keep the cap as set
