"""`scripts/bench metrics-cost` (issue 12) runs and reports what it says: the proxy's CPU
with neither metrics nor ledger, with metrics, and with metrics and the ledger, and the
in-process cost of the one metrics call and the one ledger call. Correctness only, on a
tiny run: the figures themselves belong to the benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_metrics_cost_reports_metrics_and_the_ledger(tmp_path: Path) -> None:
    argv = ["--requests", "20", "--streams", "5", "--rounds", "1", "--calls", "200"]
    done = subprocess.run(
        [sys.executable, "bench/metrics_cost.py", *argv, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout
    assert "| neither (before) | metrics | metrics + ledger (after) |" in table
    for row in ("per non-streamed request", "per streamed request", "per streamed token"):
        assert f"| {row}" in table
    assert "`UsageLedger.record`" in table and "`Metrics.request_finished`" in table
    [result] = [json.loads(p.read_text()) for p in tmp_path.glob("metrics-cost-*.json")]
    assert set(result["best"]) == {"neither", "metrics", "ledger"}
    [ledger_run] = result["rounds"]["ledger"]
    # Every request of the ledger run was written: warm-up 50 + 20 requests + 5 streams.
    assert ledger_run["ledger_rows"] == ledger_run["ledger_expected"] == 75
    assert result["micro"]["ledger_record_us"] > 0 and result["micro"]["ledger_write_us"] > 0
