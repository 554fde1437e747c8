"""A key's token limit against one request that multiplies its work: `n` choices of one
prompt make llama.cpp evaluate that prompt once per choice, and the limit must count it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

KEY = "sk-tpm-hostile-0123456789"


def test_n_choices_charge_the_prompt_llamacpp_evaluated_for_each(
    make_stack: Any, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.tpm]\nkey = "{KEY}"\ntokens_per_minute = 100000\n')
    stack = make_stack(api_keys_file=keys)
    headers = {"Authorization": f"Bearer {KEY}"}
    big = {
        "messages": [{"role": "user", "content": "lorem ipsum " * 40}],
        "n": 8,
        "max_tokens": 1,
    }
    small = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with httpx.Client(base_url=stack.url, timeout=20) as http:
        first = http.post("/v1/chat/completions", json=big, headers=headers)
        assert first.status_code == 200
        usage = first.json()["usage"]
        # The answer's usage counts the prompt once, as OpenAI's does...
        assert len(stack.fake.requests) == 8
        # ...but llama.cpp evaluated it for each of the 8 choices (no cache in the fake):
        # that is what the key's minute is charged.
        second = http.post("/v1/chat/completions", content=json.dumps(small), headers=headers)
        assert second.status_code == 200
        reserved_now = -(-len(json.dumps(small).encode()) // 4) + 1
        remaining = int(second.headers["x-ratelimit-remaining-tokens"])
        charged = 100000 - reserved_now - remaining
        assert charged == 8 * usage["prompt_tokens"] + usage["completion_tokens"]
