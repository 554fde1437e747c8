"""The TOML config file (--config): the command-line options, by the same names, in one file.

The file is mapped onto the argparse parser itself (its actions are the one list of options),
so an option added to `build_parser()` is a config-file setting at once, with the same type
checks, choices and default. Keys are the long option names without `--` (`port = 8000`,
`llamacpp-server = "http://..."`); tables such as `[server]` or `[upstream]` only group them.
A flag (`--log-json`) is `log-json = true`; a repeated or multi-value option takes a list.
"""

from __future__ import annotations

import argparse
import re
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config import NOT_SETTINGS, ConfigError, build_parser

MAX_CONFIG_FILE_SIZE = 1024 * 1024


def settings_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config-file key -> the parser's action, for every option that is a setting."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in NOT_SETTINGS or not action.option_strings:
            continue
        long_names = [o for o in action.option_strings if o.startswith("--")]
        if long_names:
            actions[long_names[0][2:]] = action
    return actions


def _line_of(text: str, key: str) -> int | None:
    match = re.search(rf"^[ \t]*[\"']?{re.escape(key)}[\"']?[ \t]*=", text, re.M)
    return text.count("\n", 0, match.start()) + 1 if match else None


def _settings(data: dict[str, Any], where: str = "") -> Iterator[tuple[str, Any, str]]:
    """(key, value, table) for every key at the top level or one table down."""
    for key, value in data.items():
        if isinstance(value, dict):
            if where:
                raise ConfigError(f"[{where}.{key}]: tables only group settings, one level deep")
            yield from _settings(value, key)
        else:
            yield key, value, where


def _is_flag(action: argparse.Action) -> bool:
    return action.nargs == 0


def _tokens(key: str, value: Any, action: argparse.Action) -> list[str]:
    """The command-line tokens that say what `key = value` says; ValueError if they cannot."""
    option = action.option_strings[-1] if _is_flag(action) else f"--{key}"
    if _is_flag(action):
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return [option] if value else []
    many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not many:
        raise ValueError("takes one value, not a list")
    if many and not values and action.nargs == "+":
        return []  # an empty list: the default (none)
    texts = []
    for item in values:
        if isinstance(item, bool | dict | list) or not isinstance(item, str | int | float):
            raise ValueError("must be a string or a number")
        text = str(item)
        try:
            converted = action.type(text) if callable(action.type) else text
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ValueError(str(exc) or f"invalid value {text!r}") from exc
        if action.choices is not None and converted not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise ValueError(f"must be one of {choices}, not {text!r}")
        texts.append(text)
    if isinstance(action, argparse._AppendAction):
        return [f"{option}={text}" for text in texts]
    if many:
        return [option, *texts]
    return [f"{option}={texts[0]}"]


def config_file_argv(path: Path, parser: argparse.ArgumentParser | None = None) -> list[str]:
    """The config file as command-line tokens, to be parsed before the real ones (which then
    override it); ConfigError names the file, the setting and its line."""
    parser = parser or build_parser()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CONFIG_FILE_SIZE:
        raise ConfigError(f"--config {path}: larger than {MAX_CONFIG_FILE_SIZE} bytes")
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: not valid TOML: {exc}") from exc
    actions = settings_actions(parser)
    base = path.parent
    argv: list[str] = []
    seen: dict[str, str] = {}
    try:
        settings = list(_settings(data))
    except ConfigError as exc:
        raise ConfigError(f"--config {path}: {exc}") from exc
    for key, value, table in settings:
        line = _line_of(text, key)
        at = f"{path}:{line}" if line else str(path)
        name = f"[{table}] {key}" if table else key
        action = actions.get(key) or actions.get(key.replace("_", "-"))
        if action is None:
            raise ConfigError(
                f"{at}: unknown setting '{name}' (settings are the long option names of "
                "llamacpp-proxy-server --help, without the leading --)"
            )
        if action.dest in seen:
            raise ConfigError(f"{at}: '{name}' repeats '{seen[action.dest]}'")
        seen[action.dest] = name
        if action.type is Path and isinstance(value, str) and value:
            # Relative paths are relative to the config file, not to wherever it is run from.
            value = str(base / value)
        try:
            argv.extend(_tokens(key.replace("_", "-"), value, action))
        except ValueError as exc:
            raise ConfigError(f"{at}: '{name}' {exc}") from exc
    return argv


SECRET_SETTINGS = {"metrics-key": "METRICS_API_KEY", "admin-key": "ADMIN_API_KEY"}
"""Settings that are credentials, with the environment variable that can hold them instead."""


def exposed_secrets(path: Path) -> list[str]:
    """What in the config file is a credential other users can read (the file is readable by
    its group or by anyone): one sentence each, naming the setting, never its value. The
    file is read as config_file_argv read it; an unreadable file has nothing to say here."""
    try:
        if path.stat().st_mode & 0o044 == 0:
            return []
        data = tomllib.loads(path.read_text("utf-8"))
        settings = list(_settings(data))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ConfigError):
        return []
    found = []
    for key, value, _ in settings:
        name = key.replace("_", "-")
        if name in SECRET_SETTINGS and value:
            found.append(
                f"{path}: '{name}' is a credential in a file other users can read: put it in "
                f"the environment ({SECRET_SETTINGS[name]}, e.g. in keys.env) or make the "
                "file readable by the service alone"
            )
        elif name == "redis-url" and isinstance(value, str):
            try:
                password = urlsplit(value).password
            except ValueError:
                password = None
            if password:
                found.append(
                    f"{path}: 'redis-url' holds a password in a file other users can read: "
                    "make the file readable by the service alone"
                )
    return found


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def example_config() -> str:
    """deploy/config.example.toml: every setting, its help and its default, commented out."""
    parser = build_parser()
    lines = [
        "# llamacpp-proxy-server --config /etc/llamacpp-proxy/config.toml",
        "#",
        "# Every setting of `llamacpp-proxy-server --help`, by its option name without the",
        "# leading --, with its default. Uncomment what you change; flags given on the command",
        "# line override this file. Relative paths are relative to this file. API keys stay",
        "# out of it: use api-keys-file (make keys with llamacpp-proxy-keys) or the",
        "# environment (UNLIMITED_API_KEY, LIMITED_API_KEY). Check it with --check.",
        "# Generated by: python -m llamacpp_proxy.config_file > deploy/config.example.toml",
    ]
    for key, action in settings_actions(parser).items():
        lines.append("")
        lines.extend(
            textwrap.wrap(action.help or "", 94, initial_indent="# ", subsequent_indent="# ")
        )
        if action.choices is not None:
            lines.append(f"# one of: {', '.join(map(str, action.choices))}")
        if _is_flag(action):
            lines.append(f"# {key} = false")  # a flag is off unless given
        elif action.default is None:
            lines.append(f"# {key} = (not set)")
        else:
            lines.append(f"# {key} = {_toml_value(action.default)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(example_config(), end="")
