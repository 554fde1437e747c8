"""GET /status: admin keys only (no key 401, other keys 403), one HTML page that refreshes
itself, rendered in a real browser (Debian's chromium, headless)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llamacpp_proxy.observe.metrics import KeyDay
from llamacpp_proxy.observe.snapshot import ModelSnapshot, ServerSnapshot
from llamacpp_proxy.observe.status import BudgetLine, KeyRow, StatusPage, StatusView

from .conftest import LIMITED_KEY, UNLIMITED_KEY, Stack

ADMIN_KEY = "sk-test-admin-0123456789"
OPS_KEY = "sk-test-ops-key-0123456789"

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(
        f'[keys.ops]\nkey = "{OPS_KEY}"\nadmin = true\n\n'
        '[keys.batch]\nkey = "sk-test-batch-0123456789"\nrequests = 100\ntokens_per_minute = 50000\n'
        "max_concurrent = 4\n"
    )
    return path


def chat(stack: Stack, key: str, content: str = "hello") -> None:
    answer = stack.http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": content}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert answer.status_code == 200


def test_status_needs_an_admin_key(make_stack: Callable[..., Stack], key_file: Path) -> None:
    stack = make_stack(admin_key=ADMIN_KEY, api_keys_file=key_file)
    missing = stack.http.get("/status")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"].startswith("Basic ")
    unknown = stack.http.get("/status", headers={"Authorization": "Bearer sk-wrong-0123456789"})
    assert unknown.status_code == 401
    for key in (UNLIMITED_KEY, LIMITED_KEY, "sk-test-batch-0123456789"):
        denied = stack.http.get("/status", headers={"Authorization": f"Bearer {key}"})
        assert denied.status_code == 403
        assert denied.json()["error"]["code"] == "permission_denied"
    for auth in ({"Authorization": f"Bearer {ADMIN_KEY}"}, {"Authorization": f"Bearer {OPS_KEY}"}):
        page = stack.http.get("/status", headers=auth)
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "<script" not in page.text
        assert '<meta http-equiv="refresh"' in page.text
    basic = stack.http.get("/status", auth=("anyone", ADMIN_KEY))
    assert basic.status_code == 200
    wrong_basic = stack.http.get("/status", auth=("anyone", "not-the-key"))
    assert wrong_basic.status_code == 401
    # The admin key is for the page only: it spends nothing.
    refused = stack.http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert refused.status_code == 401


def test_status_shows_models_servers_and_keys_today(
    make_stack: Callable[..., Stack], key_file: Path
) -> None:
    stack = make_stack(admin_key=ADMIN_KEY, api_keys_file=key_file)
    for _ in range(3):
        chat(stack, UNLIMITED_KEY)
    chat(stack, LIMITED_KEY)
    page = stack.http.get("/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    server = stack.fake.url.removeprefix("http://")
    assert f'data-server="{server}"' in page
    assert '<span class="state ready">ready</span>' in page
    row = re.search(r'<tr data-key="unlimited">(.*?)</tr>', page, re.S)
    assert row is not None
    cells = re.findall(r'<td class="num">(\d+)</td>', row.group(1))
    assert cells[0] == "3"  # requests today
    batch = re.search(r'<tr data-key="batch">(.*?)</tr>', page, re.S)
    assert batch is not None
    assert "100 requests / 60s" in batch.group(1)
    assert "50000 tokens / min" in batch.group(1)
    assert "4 concurrent" in batch.group(1)


def test_status_page_escapes_names_and_shows_budgets() -> None:
    view = StatusView(
        models=[ModelSnapshot("<b>m</b>", (ServerSnapshot("h:1", "down", 0, None),), 0, 2)],
        keys=[
            KeyRow(
                "alice",
                ["10 requests / 60s"],
                KeyDay(requests=4, prompt_tokens=900, completion_tokens=100),
                budgets=[BudgetLine("tokens today", 1000, 4000, "2026-01-02T00:00Z")],
            )
        ],
    )
    html = StatusPage().render(view)
    assert "<b>m</b>" not in html and "&lt;b&gt;m&lt;/b&gt;" in html
    assert "tokens today" in html and "1000 / 4000" in html
    assert 'style="width: 25%"' in html  # the budget's bar


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        # Not a skip: .ci/run installs it (apt-get install chromium).
        raise AssertionError("chromium is not installed: apt-get install -y chromium")
    return path


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_status_page_renders_in_chromium(
    make_stack: Callable[..., Stack], key_file: Path, tmp_path: Path
) -> None:
    stack = make_stack(admin_key=ADMIN_KEY, api_keys_file=key_file)
    for i in range(5):
        chat(stack, UNLIMITED_KEY, f"hello {i}")
    chat(stack, LIMITED_KEY)
    chat(stack, OPS_KEY)
    # A browser sends the key as Basic auth (the page's 401 asks for it).
    url = f"http://status:{ADMIN_KEY}@127.0.0.1:{stack.port}/status"
    dom = run_chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<h1>llamacpp-proxy status</h1>" in dom.stdout
    row = re.search(r'<tr data-key="unlimited">(.*?)</tr>', dom.stdout, re.S)
    assert row is not None, dom.stdout[:2000]
    assert re.findall(r'<td class="num">(\d+)</td>', row.group(1))[0] == "5"
    # Without the key the browser gets the 401, not the page.
    refused = run_chromium(tmp_path, "--dump-dom", f"http://127.0.0.1:{stack.port}/status")
    assert "llamacpp-proxy status" not in refused.stdout
    # Headless, nobody can answer the Basic prompt: the load fails, or shows the error body.
    assert "invalid_api_key" in refused.stdout or "ERR_INVALID_AUTH" in refused.stderr
    shot = tmp_path / "status.png"
    taken = run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,720", url)
    assert taken.returncode == 0, taken.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 1200  # the PNG header's width
    keep: Any = os.environ.get("STATUS_SCREENSHOT")
    if keep:  # STATUS_SCREENSHOT=docs/status.png refreshes the docs' screenshot
        shutil.copyfile(shot, keep)
