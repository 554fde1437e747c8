"""The legacy SDK (`openai<1`, `openai.ChatCompletion.create` with `openai.api_base`), as the
README shows it, against the real stack; it runs in its own venv (see legacy_openai_python).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import UNLIMITED_KEY

from .conftest import Service, child_env

pytestmark = pytest.mark.e2e

CLIENT = Path(__file__).with_name("legacy_sdk_client.py")


def test_legacy_sdk_chat_stream_completion_and_errors(
    proxy: Service, legacy_openai_python: Path
) -> None:
    done = subprocess.run(
        [str(legacy_openai_python), str(CLIENT), proxy.url + "/v1", UNLIMITED_KEY],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])

    assert seen["version"].startswith("0.")
    chat = seen["chat"]
    assert chat["object"] == "chat.completion"
    assert chat["role"] == "assistant"
    assert chat["content"].strip()
    assert chat["finish_reason"] in ("stop", "length")
    assert chat["usage"]["total_tokens"] == (
        chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"]
    )

    stream = seen["stream"]
    assert stream["chunks"] >= 3  # role, some content, finish
    assert stream["role"] == "assistant"
    assert stream["content"].strip()
    assert stream["finish_reason"] in ("stop", "length")

    assert seen["completion"]["text"].startswith("5")
    assert seen["wrong_key"] == {"status": 401, "error": "AuthenticationError"}
