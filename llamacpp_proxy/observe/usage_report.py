"""`llamacpp-proxy-usage`: who used how much, from the usage ledger (--usage-db).

    llamacpp-proxy-usage --usage-db /var/lib/llamacpp-proxy/usage.db
    llamacpp-proxy-usage --usage-db usage.db --by key,model,day --since 2025-06-01 --format csv

Per group (key by default; any of key, model, day, in that order): requests, errors (status
400 and above, 499 included), prompt, completion, cached and total tokens, over a period of
UTC days (the last 7 by default). Reads only: safe while the gateway writes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import sqlite3
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

GROUPS = {"key": "key", "model": "model", "day": "date(time, 'unixepoch')"}
METRICS = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "total_tokens",
)


def _day(text: str) -> float:
    """A UTC date (2025-06-01) or date and time (2025-06-01T12:00) -> Unix seconds."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date: {text!r}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _groups(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--by takes key, model and/or day, not {text!r}")
    return [n for n in GROUPS if n in names]  # one order, whatever was typed


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="llamacpp-proxy-usage",
        description="Requests and tokens per key (and model, day) from the gateway's usage ledger.",
    )
    p.add_argument("--usage-db", type=Path, required=True, metavar="PATH", help="the ledger")
    p.add_argument(
        "--since",
        type=_day,
        metavar="DATE",
        help="from this UTC date or time (default: 7 days before --until)",
    )
    p.add_argument(
        "--until", type=_day, metavar="DATE", help="up to (not including) this (default: now)"
    )
    p.add_argument(
        "--by", type=_groups, default=["key"], metavar="key,model,day", help="group by these"
    )
    p.add_argument("--key", action="append", metavar="NAME", help="only this key (repeatable)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    return p


def query(
    db: sqlite3.Connection,
    by: Sequence[str],
    since: float,
    until: float,
    keys: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One dict per group: the group's columns, then METRICS."""
    cols = [f"{GROUPS[g]} AS {g}" for g in by]
    where = "time >= ? AND time < ?"
    args: list[Any] = [since, until]
    if keys:
        where += f" AND key IN ({', '.join('?' * len(keys))})"
        args += list(keys)
    sql = (
        f"SELECT {', '.join(cols)}, COUNT(*), SUM(status >= 400), SUM(prompt_tokens), "
        "SUM(completion_tokens), SUM(cached_tokens), SUM(prompt_tokens + completion_tokens) "
        f"FROM usage WHERE {where} GROUP BY {', '.join(by)} ORDER BY {', '.join(by)}"
    )
    out = []
    for row in db.execute(sql, args):
        entry = dict(zip(by, row[: len(by)], strict=True))
        entry.update(zip(METRICS, (int(v or 0) for v in row[len(by) :]), strict=True))
        out.append(entry)
    return out


def render(rows: list[dict[str, Any]], by: Sequence[str], fmt: str) -> str:
    """The rows as an aligned table, CSV or JSON."""
    header = [*by, *METRICS]
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if row[h] is None else row[h] for h in header])
        return buf.getvalue()
    cells = [header] + [["-" if row[h] is None else str(row[h]) for h in header] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    numeric = [h in METRICS for h in header]
    lines = [
        "  ".join(
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(line, widths, numeric, strict=True)
        ).rstrip()
        for line in cells
    ]
    if not rows:
        lines.append("(no requests in this period)")
    return "\n".join(lines) + "\n"


def _read(
    path: Path, by: Sequence[str], since: float, until: float, keys: Sequence[str] | None
) -> list[dict[str, Any]]:
    """The report's rows, read without creating or changing anything."""
    # Read-only: a report never creates or changes the ledger.
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
            return query(db, by, since, until, keys)
    except sqlite3.OperationalError:
        # A WAL file with no gateway running has no -shm file, and a reader must create
        # one: a user who may read the ledger but not write its directory (an operator
        # reading the service's state directory) got "attempt to write a readonly
        # database". With no -shm there is no writer (a writer in WAL mode keeps one), so
        # the file is read as it is, as immutable.
        if Path(f"{path}-shm").exists():
            raise
    with contextlib.closing(sqlite3.connect(uri + "&immutable=1", uri=True, timeout=5)) as db:
        return query(db, by, since, until, keys)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report; 2 on a bad command line or an unreadable ledger."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    until = args.until if args.until is not None else time.time()
    since = args.since if args.since is not None else until - timedelta(days=7).total_seconds()
    if since >= until:
        # An empty period would print "no requests": a report that looks like a quiet week.
        parser.error("--since must be before --until (--until defaults to now)")
    if not args.usage_db.is_file():
        print(f"llamacpp-proxy-usage: error: no ledger at {args.usage_db}", file=sys.stderr)
        return 2
    try:
        rows = _read(args.usage_db, args.by, since, until, args.key)
    except sqlite3.Error as exc:
        print(f"llamacpp-proxy-usage: error: {args.usage_db}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render(rows, args.by, args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
