"""--config: every command-line option in one TOML file; flags override it; mistakes are named
with their line; deploy/config.example.toml lists every setting of --help with its default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llamacpp_proxy.config import ConfigError, Settings, build_parser, load_settings
from llamacpp_proxy.config_file import example_config, settings_actions

ENV = {"UNLIMITED_API_KEY": "sk-test-unlimited-123"}
EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "config.example.toml"

# A value other than the default for every setting: the test below fails when an option is
# added without one, so no option can miss the config file unnoticed.
VALUES: dict[str, object] = {
    "host": "127.0.0.2",
    "port": 9001,
    "llamacpp-server": "http://127.0.0.1:9090",
    "chat-template-jinja": "chatml",
    "allow-content-control-tokens": True,
    "rate-limit-window": 30.5,
    "rate-limit-max-requests": 7,
    "api-keys-file": "/etc/llamacpp-proxy/keys.toml",
    "redis-url": "redis://127.0.0.1:6390/1",
    "redis-failure-mode": "open",
    "auth-failure-limit": 3,
    "auth-failure-window": 9.0,
    "max-body-size": 1000,
    "upstream-connect-timeout": 1.5,
    "upstream-first-byte-timeout": 11.0,
    "upstream-idle-timeout": 12.0,
    "upstream-max-connections": 13,
    "upstream-spare-connections": 3,
    "max-tokens-limit": 14,
    "max-parallel-generations": 2,
    "max-connections": 15,
    "client-idle-timeout": 16.0,
    "client-body-timeout": 17.0,
    "shutdown-timeout": 18.0,
    "no-access-log": True,
    "log-json": True,
    "log-level": "debug",
    "model-name": "smollm2",
    "tls-cert": "/etc/llamacpp-proxy/cert.pem",
    "tls-key": "/etc/llamacpp-proxy/key.pem",
    "cors-allow-origins": ["https://a.example", "https://b.example"],
    "routing": "round-robin",
    "max-queue": 5,
    "queue-timeout": 6.5,
    "queue-keepalive": 2.5,
    "eject-after-failures": 3,
    "tools-policy": "drop",
    "usage-db": "/var/lib/llamacpp-proxy/usage.db",
    "workers": 2,
    "no-metrics": True,
    "metrics-key": "mk-test-0123456789",
    "admin-key": "ak-test-0123456789",
}
# Options that exclude one in VALUES: each is checked on its own.
EXCLUSIVE: dict[str, object] = {"upstreams-file": "/etc/llamacpp-proxy/upstreams.toml"}


def toml(value: object) -> str:
    if value is True:
        return "true"
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def flags(values: dict[str, object]) -> list[str]:
    argv: list[str] = []
    for key, value in values.items():
        if value is True:
            argv.append(f"--{key}")
        elif isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv.append(f"--{key}={value}")
    return argv


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_every_option_has_a_test_value() -> None:
    assert set(VALUES) | set(EXCLUSIVE) == set(settings_actions(build_parser()))


def test_every_option_in_the_file_means_what_the_flag_means(tmp_path: Path) -> None:
    # Grouped in tables as an operator would; the grouping carries no meaning.
    keys = list(VALUES)
    text = "\n".join(f"{k} = {toml(VALUES[k])}" for k in keys[:3])
    text += "\n[upstream]\n" + "\n".join(f"{k} = {toml(VALUES[k])}" for k in keys[3:])
    from_file = load_settings(["--config", str(write(tmp_path, text))], ENV)
    from_flags = load_settings(flags(VALUES), ENV)
    assert from_file == from_flags
    assert from_file != load_settings([], ENV)
    assert from_file.port == 9001 and from_file.access_log is False
    assert from_file.cors_allow_origins == ("https://a.example", "https://b.example")


def test_an_option_that_excludes_another_means_in_the_file_what_its_flag_means(
    tmp_path: Path,
) -> None:
    for key, value in EXCLUSIVE.items():
        from_file = load_settings(["--config", str(write(tmp_path, f"{key} = {toml(value)}"))], ENV)
        assert from_file == load_settings(flags({key: value}), ENV)
        assert from_file != load_settings([], ENV)


def test_flags_override_the_file_and_the_environment_still_gives_keys(tmp_path: Path) -> None:
    path = write(tmp_path, 'port = 9001\nlog-level = "debug"\n')
    settings = load_settings(["--config", str(path), "--port", "9002"], ENV)
    assert settings.port == 9002
    assert settings.log_level == "debug"
    assert settings.unlimited_api_key == ENV["UNLIMITED_API_KEY"]
    # The order on the command line does not matter: a flag always wins over the file.
    assert load_settings(["--port", "9003", "--config", str(path)], ENV).port == 9003


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'api-keys-file = "keys.toml"\n')
    settings = load_settings(["--config", str(path)], {})
    assert settings.api_keys_file == tmp_path / "keys.toml"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('host = "::1"\n\nport = 80\nlisten-port = 8001\n', ":4: unknown setting 'listen-port'"),
        ("[server]\nhost = 1\nprot = 8001\n", ":3: unknown setting '[server] prot'"),
        ("port = 70000\n", ":1: 'port' must be 0..65535"),
        ('log-level = "loud"\n', ":1: 'log-level' must be one of debug, info"),
        ('log-json = "yes"\n', ":1: 'log-json' must be true or false"),
        ("port = [1, 2]\n", ":1: 'port' takes one value, not a list"),
        ("config = 'other.toml'\n", ":1: unknown setting 'config'"),
        ("check = true\n", ":1: unknown setting 'check'"),
        ("port = 1\n[limits]\nport = 2\n", "'[limits] port' repeats 'port'"),
        ("port = \n", "not valid TOML"),
    ],
)
def test_mistakes_name_the_setting_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(["--config", str(path)], ENV)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(["--config", str(tmp_path / "nope.toml")], ENV)


def test_the_example_file_is_every_setting_of_help_with_its_default() -> None:
    shipped = EXAMPLE.read_text()
    assert shipped == example_config(), (
        "deploy/config.example.toml is stale: "
        "python -m llamacpp_proxy.config_file > deploy/config.example.toml"
    )
    help_text = build_parser().format_help()
    options = set(re.findall(r"^\s+(?:-\w, )?--([a-z0-9-]+)", help_text, re.M))
    documented = set(re.findall(r"^# ([a-z0-9-]+) = ", shipped, re.M))
    assert documented == options - {"help", "version", "config", "check"}
    # Each default in the file is the one --help prints.
    options_text = help_text.split("options:", 1)[1]
    for key, value in re.findall(r"^# ([a-z0-9-]+) = (.+)$", shipped, re.M):
        match = re.search(rf"^  --{key}\b[^\n]*(?:\n {{20,}}[^\n]*)*", options_text, re.M)
        assert match, key
        if value not in ("false", "(not set)", "[]"):
            assert f"(default: {value.strip(chr(34))})" in " ".join(match.group(0).split()), key


def test_the_example_file_loads_uncommented_as_the_defaults(tmp_path: Path) -> None:
    lines = [
        line[2:]
        for line in EXAMPLE.read_text().splitlines()
        if re.match(r"# [a-z0-9-]+ = ", line) and "(not set)" not in line
    ]
    path = write(tmp_path, "\n".join(lines) + "\n")
    assert load_settings(["--config", str(path)], ENV) == Settings(
        unlimited_api_key=ENV["UNLIMITED_API_KEY"]
    )


def test_servers_given_as_flags_replace_the_files_servers(tmp_path: Path) -> None:
    # A drop-in or a one-off run that names its servers means "these servers", not "these
    # as well": appended to the file's, one server would sit twice in the pool.
    path = write(tmp_path, 'llamacpp-server = ["http://127.0.0.1:8080"]\nport = 9001\n')
    both = ["--llamacpp-server", "http://127.0.0.1:8080", "--llamacpp-server", "http://h:8081"]
    settings = load_settings(["--config", str(path), *both], ENV)
    assert settings.llamacpp_server == ("http://127.0.0.1:8080", "http://h:8081")
    assert settings.port == 9001  # the rest of the file still holds
    upstreams = tmp_path / "upstreams.toml"
    upstreams.write_text('[models.m]\nservers = ["http://127.0.0.1:8082"]\n')
    settings = load_settings(["--config", str(path), "--upstreams-file", str(upstreams)], ENV)
    assert settings.upstreams_file == upstreams
    assert settings.llamacpp_server == Settings().llamacpp_server  # the file's are not used
    # And the other way round: the file's upstreams file gives way to servers given as flags.
    path = write(tmp_path, f'upstreams-file = "{upstreams}"\n')
    settings = load_settings(["--config", str(path), "--llamacpp-server", "http://h:8083"], ENV)
    assert (settings.llamacpp_server, settings.upstreams_file) == (("http://h:8083",), None)
