#!/usr/bin/env python3
"""The table of bench/interleave.sh's runs: per worktree and round, the proxy's own CPU per
non-streamed request (32 clients, plain and control-token chat) and per streamed token
(32 streams), req/s, p50 at 1 client, and the load average each run started and ended with.

    bench/summarize.py OUT_DIR
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def pick(points: list[dict[str, Any]], label: str, conns: int) -> dict[str, Any] | None:
    for p in points:
        if p["system"] == "proxy" and p["label"] == label and p["connections"] == conns:
            return p
    return None


def figures(run: dict[str, Any]) -> dict[str, float | None]:
    pts = run["points"]
    chat32, chat1 = pick(pts, "chat", 32), pick(pts, "chat", 1)
    forged = next(
        (p for p in pts if p["system"] == "proxy" and "control" in p["label"].lower()), None
    )
    stream32 = pick(pts, "stream", 32)
    return {
        "cpu/req 32": chat32 and chat32["min_cpu_per_request_us"],
        "req/s 32": chat32 and chat32["best"]["rps"],
        "p50 1 ms": chat1 and chat1["best"]["p50_ms"],
        "cpu/req ctl": forged and forged["min_cpu_per_request_us"],
        "cpu/tok 32": stream32 and stream32.get("min_cpu_per_token_us"),
        "tok/s 32": stream32 and stream32.get("token_events_per_s"),
    }


def main() -> None:
    out = Path(sys.argv[1])
    cols = ["cpu/req 32", "req/s 32", "p50 1 ms", "cpu/req ctl", "cpu/tok 32", "tok/s 32"]
    print("| worktree | run | load start / end | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---:|" * len(cols))
    for wt in sorted(d for d in out.iterdir() if d.is_dir()):
        per: dict[str, list[float]] = {c: [] for c in cols}
        for path in sorted(wt.glob("*.json")):
            run = json.loads(path.read_text())
            f = figures(run)
            m = run["machine"]
            load = f"{m['loadavg_start'][0]} / {m.get('loadavg_end', ['?'])[0]}"
            cells = []
            for c in cols:
                v = f[c]
                cells.append("" if v is None else f"{v:,.2f}" if v < 10 else f"{v:,.0f}")
                if v is not None:
                    per[c].append(v)
            print(f"| {wt.name} | {run['timestamp']} | {load} | " + " | ".join(cells) + " |")
        med = [f"{statistics.median(per[c]):,.2f}" if per[c] else "" for c in cols]
        print(f"| {wt.name} | median | | " + " | ".join(med) + " |")


if __name__ == "__main__":
    main()
