"""llamacpp-proxy-keys: the key it prints is accepted by a proxy whose key file holds only the
block it prints, with the limits asked for; `hash` gives the digest the key file expects."""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from llamacpp_proxy.guard.auth import Limits, load_key_file
from llamacpp_proxy.keys_tool import main

from .conftest import Stack


def run(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def test_new_prints_a_random_key_once_and_a_block_with_only_its_digest(tmp_path: Path) -> None:
    status, block, shown = run(
        ["new", "alice", "--requests", "5", "--window", "30", "--tokens-per-minute", "900"]
    )
    assert status == 0
    name, key = shown.strip().split(": ")
    assert name == "alice"
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{32,}", key)
    assert key not in block
    key_file = tmp_path / "keys.toml"
    key_file.write_text(block)
    (principal,) = load_key_file(key_file).values()
    assert principal.name == "alice"
    assert principal.limits == Limits(requests=5, window=30.0, tokens_per_minute=900)
    # Two keys are never the same.
    assert run(["new", "bob"])[2].split(": ")[1] != key


def test_the_printed_key_works_against_the_proxy(
    tmp_path: Path, make_stack: Callable[..., Stack]
) -> None:
    _, block, shown = run(["new", "carol", "--max-concurrent", "2"])
    key = shown.strip().split(": ")[1]
    key_file = tmp_path / "keys.toml"
    key_file.write_text(block)
    stack = make_stack(api_keys_file=key_file)
    with stack.client(key=key) as client:
        assert client.models.list().data
    with stack.client(key=key + "x") as client, pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_hash_reads_the_key_from_stdin(tmp_path: Path) -> None:
    status, digest, _ = run(["hash"], stdin="sk-existing-key-123\n")
    assert status == 0
    key_file = tmp_path / "keys.toml"
    key_file.write_text(f'[keys.old]\nkey_sha256 = "{digest.strip()}"\n')
    assert list(load_key_file(key_file)) == [hashlib.sha256(b"sk-existing-key-123").digest()]
    assert run(["hash"], stdin="")[0] == 2


@pytest.mark.parametrize(
    "argv", [["new", "a b"], ["new", "x", "--requests", "0"], ["new", "x", "--window", "5"]]
)
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run(argv)
    assert info.value.code == 2


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "llamacpp-proxy-keys"
    done = subprocess.run(
        [str(script), "new", "dave"], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.startswith("[keys.dave]\nkey_sha256 = ")
    assert done.stderr.startswith("dave: sk-")
