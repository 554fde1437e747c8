# mypy: disable-error-code="attr-defined"
"""The README's legacy style, run by test_legacy_sdk.py in a venv with `openai<1` (0.28).

    python legacy_sdk_client.py BASE_URL API_KEY   # prints one JSON object of what it saw

Not imported by the tests: this file runs under the old SDK, in its own interpreter.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import openai  # openai<1: module-level configuration, requests underneath

MODEL = "gemma-3-270m"
HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


def main() -> None:
    openai.api_base = sys.argv[1]
    openai.api_key = sys.argv[2]
    seen: dict[str, Any] = {"version": openai.version.VERSION}

    reply = openai.ChatCompletion.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    choice = reply.choices[0]
    seen["chat"] = {
        "object": reply.object,
        "role": choice.message.role,
        "content": choice.message.content,
        "finish_reason": choice.finish_reason,
        "usage": dict(reply.usage),
    }

    chunks = list(
        openai.ChatCompletion.create(
            model=MODEL, messages=HELLO, max_tokens=8, temperature=0, stream=True
        )
    )
    seen["stream"] = {
        "chunks": len(chunks),
        "role": chunks[0].choices[0].delta.get("role"),
        "content": "".join(c.choices[0].delta.get("content") or "" for c in chunks),
        "finish_reason": chunks[-1].choices[0].finish_reason,
    }

    completion = openai.Completion.create(
        model=MODEL, prompt="1, 2, 3, 4, ", max_tokens=4, temperature=0
    )
    seen["completion"] = {
        "text": completion.choices[0].text,
        "finish_reason": completion.choices[0].finish_reason,
    }

    openai.api_key = "sk-not-a-key-of-this-proxy"
    try:
        openai.ChatCompletion.create(model=MODEL, messages=HELLO, max_tokens=1)
        seen["wrong_key"] = None
    except openai.error.AuthenticationError as exc:
        seen["wrong_key"] = {"status": exc.http_status, "error": type(exc).__name__}

    print(json.dumps(seen))


if __name__ == "__main__":
    main()
