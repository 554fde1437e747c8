"""API keys: who a bearer key belongs to (a principal) and what limits apply to it.

Keys are held only as sha256 digests and looked up by the digest of the presented key, so
neither the lookup's timing (it depends on the digest, not on how many leading characters of
a key match) nor a memory dump reveals a key.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..route.pools import parse_key_models

MAX_KEY_FILE_SIZE = 1024 * 1024
"""A key file larger than this is refused: a real one holds hundreds of keys, not megabytes."""

UNLIMITED_KEY_NAME = "unlimited"
LIMITED_KEY_NAME = "limited"


class KeyFileError(ValueError):
    """The key file cannot be used; the message says which entry and why."""


@dataclass(frozen=True)
class Limits:
    """The limits of one key; None disables that limit."""

    requests: int | None = None
    """Requests admitted in any interval of `window` seconds."""
    window: float = 60.0
    """Length of the request window, in seconds."""
    tokens_per_minute: int | None = None
    """Prompt plus completion tokens, as llama.cpp counted them, per sliding minute."""
    max_concurrent: int | None = None
    """Requests of this key in progress at once."""


@dataclass(frozen=True)
class Budget:
    """Tokens a key may use per calendar day and month (None: no such budget)."""

    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    timezone: str = "UTC"
    """IANA zone whose midnight starts a day (and whose 1st a month)."""


@dataclass(frozen=True)
class Principal:
    """A named key holder. `limits` is None for a key that is never limited."""

    name: str
    limits: Limits | None = None
    models: frozenset[str] | None = None
    """Model names (or aliases) this key may use; None: every model."""
    budget: Budget | None = None
    """Daily/monthly token budgets (guard/budgets.py); None: none."""
    weight: float = 1.0
    """Share of the slots when requests wait in a model's queue (route/waitqueue.py)."""
    admin: bool = False
    """May see the status page (`admin = true` in the key file)."""

    @property
    def log_name(self) -> str:
        """The name to log (never the key)."""
        return self.name


def key_digest(key: str) -> bytes:
    """The sha256 digest a key is stored and looked up by."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyStore:
    """Maps presented bearer keys to principals."""

    def __init__(self, entries: Mapping[bytes, Principal]) -> None:
        self._by_digest = dict(entries)

    def authenticate(self, presented: str) -> Principal | None:
        """The principal of a key, or None; no state is created for unknown keys."""
        # The lookup is by digest: its timing depends on sha256 output, which an attacker
        # cannot steer byte by byte, so it leaks nothing about the stored keys.
        return self._by_digest.get(key_digest(presented))

    def __len__(self) -> int:
        return len(self._by_digest)

    @property
    def principals(self) -> list[Principal]:
        """Every principal (for checks of the whole key file)."""
        return list(self._by_digest.values())

    @property
    def names(self) -> list[str]:
        """Principal names, for start-up logs."""
        return sorted(p.name for p in self._by_digest.values())


def build_key_store(
    *,
    unlimited_key: str | None,
    limited_key: str | None,
    limited_limits: Limits,
    key_file: Path | None = None,
) -> KeyStore:
    """The environment's two keys plus the named keys of the TOML key file, if any."""
    entries: dict[bytes, Principal] = {}
    if unlimited_key:
        entries[key_digest(unlimited_key)] = Principal(UNLIMITED_KEY_NAME, None)
    if limited_key:
        if limited_key == unlimited_key:
            raise KeyFileError("LIMITED_API_KEY and UNLIMITED_API_KEY must differ")
        entries[key_digest(limited_key)] = Principal(LIMITED_KEY_NAME, limited_limits)
    if key_file is not None:
        for digest, principal in load_key_file(key_file).items():
            if digest in entries:
                raise KeyFileError(
                    f"{key_file}: key '{principal.name}' has the same secret as "
                    f"'{entries[digest].name}'"
                )
            if any(p.name == principal.name for p in entries.values()):
                raise KeyFileError(f"{key_file}: key name '{principal.name}' is reserved")
            entries[digest] = principal
    if not entries:
        raise KeyFileError(
            "no API key is configured: set UNLIMITED_API_KEY and/or LIMITED_API_KEY "
            "in the environment, or pass --api-keys-file"
        )
    return KeyStore(entries)


def load_key_file(path: Path) -> dict[bytes, Principal]:
    """Parse a TOML key file (see README, "Named keys") into digest -> principal."""
    try:
        data = tomllib.loads(_read_key_file(path))
    except tomllib.TOMLDecodeError as exc:
        raise KeyFileError(f"{path}: not valid TOML: {exc}") from exc
    keys = data.get("keys")
    if not isinstance(keys, dict) or not keys:
        raise KeyFileError(f"{path}: expected one or more [keys.NAME] tables")
    entries: dict[bytes, Principal] = {}
    for name, spec in keys.items():
        if not isinstance(spec, dict):
            raise KeyFileError(f"{path}: [keys.{name}] must be a table")
        digest = _entry_digest(path, name, spec)
        if digest in entries:
            raise KeyFileError(f"{path}: keys '{entries[digest].name}' and '{name}' share a secret")
        try:
            models = parse_key_models(spec.get("models"), f"{path}: [keys.{name}]")
        except ValueError as exc:
            raise KeyFileError(str(exc)) from None
        admin = spec.get("admin", False)
        if not isinstance(admin, bool):
            raise KeyFileError(f"{path}: [keys.{name}] 'admin' must be true or false")
        entries[digest] = Principal(
            name,
            _entry_limits(path, name, spec),
            models,
            _entry_budget(path, name, spec),
            _entry_weight(path, name, spec),
            admin,
        )
    return entries


def _read_key_file(path: Path) -> str:
    """The file's text; refuses what is not a regular file, too large, or not UTF-8."""
    try:
        # O_NONBLOCK: opening a FIFO must not block the event loop (a SIGHUP reload runs on it).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as fh:
        try:
            # Checked on the opened file (a symlink to /dev/zero is followed, then refused).
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise KeyFileError(f"{path}: not a regular file")
            raw = fh.read(MAX_KEY_FILE_SIZE + 1)
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(raw) > MAX_KEY_FILE_SIZE:
        raise KeyFileError(f"{path}: larger than {MAX_KEY_FILE_SIZE} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"{path}: not UTF-8 text (byte {exc.start})") from exc


_ENTRY_FIELDS = {
    "key",
    "key_sha256",
    "requests",
    "window",
    "tokens_per_minute",
    "max_concurrent",
    "models",
    "tokens_per_day",
    "tokens_per_month",
    "budget_timezone",
    "weight",
    "admin",
}


def _entry_digest(path: Path, name: str, spec: dict[str, Any]) -> bytes:
    unknown = set(spec) - _ENTRY_FIELDS
    if unknown:
        raise KeyFileError(
            f"{path}: [keys.{name}] has unknown fields: {', '.join(sorted(unknown))}"
        )
    key, hashed = spec.get("key"), spec.get("key_sha256")
    if (key is None) == (hashed is None):
        raise KeyFileError(f"{path}: [keys.{name}] needs exactly one of 'key' or 'key_sha256'")
    if key is not None:
        if not isinstance(key, str) or len(key) < 8:
            raise KeyFileError(f"{path}: [keys.{name}] 'key' must be a string of 8+ characters")
        return key_digest(key)
    try:
        digest = bytes.fromhex(hashed) if isinstance(hashed, str) else b""
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise KeyFileError(f"{path}: [keys.{name}] 'key_sha256' must be 64 hex digits")
    return digest


def _entry_limits(path: Path, name: str, spec: dict[str, Any]) -> Limits | None:
    values: dict[str, Any] = {}
    for field_name in ("requests", "tokens_per_minute", "max_concurrent"):
        value = spec.get(field_name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KeyFileError(f"{path}: [keys.{name}] '{field_name}' must be a positive integer")
        values[field_name] = value
    window = spec.get("window", 60)
    if isinstance(window, bool) or not isinstance(window, int | float) or window <= 0:
        raise KeyFileError(f"{path}: [keys.{name}] 'window' must be a positive number of seconds")
    if "window" in spec and "requests" not in values:
        raise KeyFileError(f"{path}: [keys.{name}] 'window' needs 'requests'")
    if not values:
        return None
    return Limits(window=float(window), **values)


def _entry_budget(path: Path, name: str, spec: dict[str, Any]) -> Budget | None:
    values: dict[str, int] = {}
    for field_name in ("tokens_per_day", "tokens_per_month"):
        value = spec.get(field_name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KeyFileError(f"{path}: [keys.{name}] '{field_name}' must be a positive integer")
        values[field_name] = value
    zone = spec.get("budget_timezone", "UTC")
    if not isinstance(zone, str) or not _valid_zone(zone):
        raise KeyFileError(
            f"{path}: [keys.{name}] 'budget_timezone' must be an IANA time zone name "
            "such as 'UTC' or 'Europe/Berlin'"
        )
    if "budget_timezone" in spec and not values:
        raise KeyFileError(
            f"{path}: [keys.{name}] 'budget_timezone' needs 'tokens_per_day' or 'tokens_per_month'"
        )
    if not values:
        return None
    return Budget(timezone=zone, **values)


def _valid_zone(zone: str) -> bool:
    from zoneinfo import ZoneInfo

    try:
        ZoneInfo(zone)
    except (ValueError, KeyError, OSError):  # ZoneInfoNotFoundError is a KeyError
        return False
    return True


def _entry_weight(path: Path, name: str, spec: dict[str, Any]) -> float:
    weight = spec.get("weight", 1)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not 0.01 <= weight <= 1000
    ):
        raise KeyFileError(f"{path}: [keys.{name}] 'weight' must be a number from 0.01 to 1000")
    return float(weight)
