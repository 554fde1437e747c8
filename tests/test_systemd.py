"""The systemd units in deploy/systemd: systemd accepts them, the proxy accepts its ExecStart
command line, no key is in a unit, and the sandboxing the deployment doc promises is there.
Also the several-servers set-ups (docs/deployment.md): the llama-server@.service template
with one environment file per instance, the gateway drop-ins for two GPUs and two models,
and the example upstreams file they name.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from llamacpp_proxy.config import ConfigError, Settings, build_parser, load_settings
from llamacpp_proxy.render.templates import load_chat_template
from llamacpp_proxy.route.pools import load_upstreams_file

UNITS = Path(__file__).resolve().parents[1] / "deploy" / "systemd"
PROXY_UNIT = UNITS / "llamacpp-proxy.service"
LLAMA_UNIT = UNITS / "llama-server.service"
KEYS_EXAMPLE = UNITS / "keys.env.example"
CONFIG = UNITS / "config.toml"
INSTALLED_CONFIG = "/etc/llamacpp-proxy/config.toml"  # where the unit reads CONFIG from
TEMPLATE_UNIT = UNITS / "llama-server@.service"
INSTANCES = UNITS / "llama-server"  # NAME.env.example: /etc/llamacpp-proxy/llama-server/NAME.env
DROP_INS = UNITS / "llamacpp-proxy.service.d"
TWO_GPUS = DROP_INS / "two-gpus.conf.example"
TWO_MODELS = DROP_INS / "two-models.conf.example"
UPSTREAMS_EXAMPLE = UNITS.parent / "upstreams.toml.example"
ALL_UNITS = (PROXY_UNIT, LLAMA_UNIT, TEMPLATE_UNIT, TWO_GPUS, TWO_MODELS)


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


def stubbed(unit: Path, stubs: Path) -> str:
    """The unit's text with every Exec command that is not installed here pointed at a
    stand-in executable in `stubs` (verify fails a unit whose command does not exist)."""
    text = unit.read_text()
    for key, values in directives(unit).items():
        if not key.startswith("Service.Exec"):
            continue
        for value in values:
            if not value:
                continue  # `ExecStart=` alone resets the list (drop-ins)
            command = shlex.split(value.lstrip("-@:+!"))[0]
            if not os.access(command, os.X_OK):
                stub = stubs / Path(command).name
                stub.write_text("#!/bin/sh\nexit 0\n")
                stub.chmod(0o755)
                text = text.replace(command, str(stub))
    return text


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        message = "systemd-analyze is missing (Debian package systemd)"
        if os.environ.get("LLAMACPP_PROXY_REQUIRE_E2E") == "1":
            pytest.fail(message + "; LLAMACPP_PROXY_REQUIRE_E2E=1 requires this check")
        pytest.skip(message)
    # Copies whose missing commands (/opt/llamacpp-proxy, /var/cache/llamacpp-proxy are not
    # installed here) point at stand-ins, everything else unchanged. The gateway unit is
    # verified alone and with each drop-in (from its own unit folder, so systemd applies
    # it: a drop-in that kept two ExecStart= lines would be refused).
    stubs = tmp_path / "bin"
    stubs.mkdir()
    checks: list[tuple[Path, list[Path]]] = []
    plain = tmp_path / "plain"
    plain.mkdir()
    for unit in (PROXY_UNIT, LLAMA_UNIT, TEMPLATE_UNIT):
        (plain / unit.name).write_text(stubbed(unit, stubs))
    checks.append((plain, [plain / u.name for u in (PROXY_UNIT, LLAMA_UNIT, TEMPLATE_UNIT)]))
    for drop_in in (TWO_GPUS, TWO_MODELS):
        folder = tmp_path / drop_in.name.removesuffix(".conf.example")
        (folder / DROP_INS.name).mkdir(parents=True)
        (folder / PROXY_UNIT.name).write_text(stubbed(PROXY_UNIT, stubs))
        (folder / DROP_INS.name / drop_in.name.removesuffix(".example")).write_text(
            stubbed(drop_in, stubs)
        )
        checks.append((folder, [folder / PROXY_UNIT.name]))

    names = [unit.name for unit in ALL_UNITS] + [
        d.name.removesuffix(".example") for d in (TWO_GPUS, TWO_MODELS)
    ]
    for folder, units in checks:
        done = subprocess.run(
            [tool, "verify", "--man=no", *map(str, units)],
            capture_output=True,
            text=True,
            timeout=120,
            # The trailing ":" keeps systemd's own unit folders after ours.
            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{folder}:"},
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        # Unknown or misspelt directives are only warnings: none may name our files.
        about_ours = [line for line in output.splitlines() if any(n in line for n in names)]
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
    for unit in (*ALL_UNITS, *INSTANCES.glob("*.env.example"), UPSTREAMS_EXAMPLE):
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


def test_the_keys_example_installed_unedited_refuses_to_start() -> None:
    # Step 4 installs keys.env.example, "then put keys in it": an operator who skips the
    # edit must not get a gateway open to the example's public keys.
    text = KEYS_EXAMPLE.read_text()
    environ = dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    argv = shipped_config(exec_argv(PROXY_UNIT))[1:]
    for name in environ:
        with pytest.raises(ConfigError, match=f"{name} is still the placeholder"):
            load_settings(argv, {name: environ[name]})
    with pytest.raises(ConfigError, match="placeholder"):  # --check says the same
        load_settings(["--check", *argv], environ)
    edited = {"UNLIMITED_API_KEY": "sk-a-real-key-0123456789"}
    assert load_settings(argv, edited).unlimited_api_key == edited["UNLIMITED_API_KEY"]


@pytest.mark.parametrize(
    "unit", [PROXY_UNIT, LLAMA_UNIT, TEMPLATE_UNIT], ids=lambda unit: unit.stem
)
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


# -- several llama-servers: the template unit, its instances, the gateway's drop-ins ------


def env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile's assignments (comments and blank lines dropped)."""
    pairs = [line.split("=", 1) for line in path.read_text().splitlines()]
    return {p[0]: p[1] for p in pairs if p[0].strip() and not p[0].startswith("#")}


def instance_ports() -> dict[str, int]:
    """Instance name -> the port its environment file gives llama-server."""
    return {
        path.name.removesuffix(".env.example"): int(env_file(path)["LLAMA_ARG_PORT"])
        for path in INSTANCES.glob("*.env.example")
    }


def drop_in_config(drop_in: Path) -> str:
    """The shipped config.toml with its [upstream] table replaced by the one the drop-in's
    header says to write there (the drop-in itself only orders the units)."""
    lines = drop_in.read_text().splitlines()
    start = lines.index("#   [upstream]")
    table = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        table.append(line.removeprefix("#   "))
    shipped = CONFIG.read_text()
    head, rest = shipped.split("\n[upstream]\n", 1)
    tail = rest[rest.index("\n[") :]  # the tables after [upstream]
    return head + "\n" + "\n".join(table) + "\n" + tail


def drop_in_settings(drop_in: Path, tmp_path: Path) -> Settings:
    """The unit's own command line (a drop-in must not replace it: it would drop the config
    file's key file, TLS and limits) reading the config as the drop-in says to edit it."""
    assert "Service.ExecStart" not in directives(drop_in), f"{drop_in.name}: keep the unit's"
    edited = tmp_path / "config.toml"
    edited.write_text(drop_in_config(drop_in))
    argv = exec_argv(PROXY_UNIT)
    argv[argv.index("--config") + 1] = str(edited)
    return load_settings(argv[1:], {"UNLIMITED_API_KEY": "x"})


def test_template_unit_reads_one_environment_file_per_instance_and_binds_loopback() -> None:
    found = directives(TEMPLATE_UNIT)
    assert found["Service.EnvironmentFile"] == ["/etc/llamacpp-proxy/llama-server/%i.env"]
    assert found["Unit.AssertPathExists"] == ["/etc/llamacpp-proxy/llama-server/%i.env"]
    argv = exec_argv(TEMPLATE_UNIT)
    assert Path(argv[0]).name == "llama-server"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # a flag beats LLAMA_ARG_HOST


def test_instance_environment_files_set_only_llama_server_settings_on_distinct_ports() -> None:
    instances = sorted(INSTANCES.glob("*.env.example"))
    assert {p.name for p in instances} >= {"gpu0.env.example", "gpu1.env.example"}
    for path in instances:
        values = env_file(path)
        # llama-server reads LLAMA_ARG_* in place of its flags; anything else would be
        # silently ignored (a typo), and the host stays the unit's loopback.
        assert all(k.startswith("LLAMA_ARG_") or k == "CUDA_VISIBLE_DEVICES" for k in values)
        assert "LLAMA_ARG_HOST" not in values, path.name
        assert {"LLAMA_ARG_PORT", "LLAMA_ARG_MODEL"} <= set(values), path.name
    ports = instance_ports()
    assert len(set(ports.values())) == len(ports), ports
    # One model on two GPUs: the same model and slots on both, different devices.
    gpu0, gpu1 = (env_file(INSTANCES / f"gpu{i}.env.example") for i in (0, 1))
    assert gpu0["LLAMA_ARG_MODEL"] == gpu1["LLAMA_ARG_MODEL"]
    assert gpu0["LLAMA_ARG_N_PARALLEL"] == gpu1["LLAMA_ARG_N_PARALLEL"]
    assert gpu0["CUDA_VISIBLE_DEVICES"] != gpu1["CUDA_VISIBLE_DEVICES"]


def test_two_gpu_drop_in_puts_both_instances_in_one_pool(tmp_path: Path) -> None:
    settings = drop_in_settings(TWO_GPUS, tmp_path)
    shipped = load_settings(shipped_config(exec_argv(PROXY_UNIT))[1:], {"UNLIMITED_API_KEY": "x"})
    # Only the servers and what names their model changed; the rest is the config file's.
    assert (settings.host, settings.port, settings.max_connections) == (
        shipped.host,
        shipped.port,
        shipped.max_connections,
    )
    assert settings.chat_template == "qwen2.5" and settings.model_name == "qwen2.5-7b"
    ports = instance_ports()
    assert settings.llamacpp_server == tuple(
        f"http://127.0.0.1:{ports[name]}" for name in ("gpu0", "gpu1")
    )
    found = directives(TWO_GPUS)
    wanted = "llama-server@gpu0.service llama-server@gpu1.service"
    assert found["Unit.Wants"] == [wanted] and found["Unit.After"] == [wanted]
    (stop_timeout,) = directives(PROXY_UNIT)["Service.TimeoutStopSec"]
    assert float(stop_timeout) > settings.shutdown_timeout + 5


def test_two_model_drop_in_and_the_example_upstreams_file_name_the_instances(
    tmp_path: Path,
) -> None:
    settings = drop_in_settings(TWO_MODELS, tmp_path)
    assert settings.upstreams_file == Path("/etc/llamacpp-proxy/upstreams.toml")
    # No server list or template beside the file: a template there would be every model's.
    assert settings.llamacpp_server == Settings.llamacpp_server
    assert settings.chat_template is None and settings.model_name is None
    routing = load_upstreams_file(UPSTREAMS_EXAMPLE)
    ports = instance_ports()
    served = {pool.name: [s.display for s in pool.servers] for pool in routing.pools}
    assert served == {
        "qwen2.5-7b": [f"127.0.0.1:{ports['gpu0']}", f"127.0.0.1:{ports['gpu1']}"],
        "qwen2.5-coder-7b": [f"127.0.0.1:{ports['coder']}"],
    }
    for pool in routing.pools:
        if pool.chat_template is not None:
            load_chat_template(pool.chat_template)
    wanted = {f"llama-server@{name}.service" for name in ports}
    found = directives(TWO_MODELS)
    assert set(found["Unit.Wants"][0].split()) == wanted
    assert set(found["Unit.After"][0].split()) == wanted
    # SIGHUP re-reads the upstreams file: the unit's own reload checks the config (which
    # names the file) and sends it; the drop-in leaves it alone.
    assert "Service.ExecReload" not in found
    reload = directives(PROXY_UNIT)["Service.ExecReload"]
    assert reload[-1] == "/bin/kill -HUP $MAINPID"
    assert "--check" in reload[-2] and "--config" in reload[-2]
