"""llamacpp-proxy-keys: make API keys for the key file (--api-keys-file) without a shell
one-liner. `new NAME` prints a fresh key once (on stderr) and the [keys.NAME] block that holds
only its sha256 digest (on stdout); `hash` prints the digest of a key read from stdin (never
from argv, where `ps` and shell history would see it)."""

from __future__ import annotations

import argparse
import re
import secrets
import sys
from collections.abc import Sequence
from typing import TextIO

from . import __version__
from .guard.auth import key_digest

KEY_PREFIX = "sk-"
KEY_RANDOM_BYTES = 32
"""secrets.token_urlsafe(32): 43 URL-safe characters, 256 random bits."""
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a TOML bare key, and what the access log prints


def new_key() -> str:
    """A new random API key."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def key_block(
    name: str,
    digest_hex: str,
    *,
    requests: int | None = None,
    window: float | None = None,
    tokens_per_minute: int | None = None,
    max_concurrent: int | None = None,
) -> str:
    """The key file's [keys.NAME] table for a key with this digest and these limits."""
    lines = [f"[keys.{name}]", f'key_sha256 = "{digest_hex}"']
    if requests is not None:
        lines.append(f"requests = {requests}")
    if window is not None:
        lines.append(f"window = {window:g}")
    if tokens_per_minute is not None:
        lines.append(f"tokens_per_minute = {tokens_per_minute}")
    if max_concurrent is not None:
        lines.append(f"max_concurrent = {max_concurrent}")
    return "\n".join(lines) + "\n"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _name(text: str) -> str:
    if not _NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be 1-64 letters, digits, '-' or '_', not {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The key tool's command line."""
    p = argparse.ArgumentParser(
        prog="llamacpp-proxy-keys", description="Make API keys for llamacpp-proxy's key file."
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    new = sub.add_parser(
        "new",
        help="print a new key once, and the [keys.NAME] block (digest only) for the key file",
    )
    new.add_argument("name", type=_name, help="the key's name (shown in logs)")
    new.add_argument("--requests", type=_positive_int, metavar="N", help="requests per window")
    new.add_argument(
        "--window", type=_positive_float, metavar="SECONDS", help="request window (default 60)"
    )
    new.add_argument("--tokens-per-minute", type=_positive_int, metavar="N")
    new.add_argument("--max-concurrent", type=_positive_int, metavar="N")
    sub.add_parser("hash", help="print the key_sha256 of a key read from stdin")
    return p


def main(
    argv: Sequence[str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the key tool; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if args.command == "hash":
        key = stdin.readline().rstrip("\r\n")
        if not key:
            print("llamacpp-proxy-keys: error: no key on stdin", file=stderr)
            return 2
        print(key_digest(key).hex(), file=stdout)
        return 0
    if args.window is not None and args.requests is None:
        parser.error("--window needs --requests")
    key = new_key()
    block = key_block(
        args.name,
        key_digest(key).hex(),
        requests=args.requests,
        window=args.window,
        tokens_per_minute=args.tokens_per_minute,
        max_concurrent=args.max_concurrent,
    )
    # The key on stderr, the block on stdout: `new NAME >> keys.toml` shows the key on the
    # terminal and appends only its digest, so the key file never holds the key itself.
    print(f"{args.name}: {key}", file=stderr)
    print(block, end="", file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
