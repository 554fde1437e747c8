"""A key's token limit against work it does not see: `n` choices of one prompt make llama.cpp
evaluate that prompt once per choice; a release retried after a lost reply must count once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from llamacpp_proxy.guard.auth import Limits, Principal
from llamacpp_proxy.guard.ratelimit import Cost
from llamacpp_proxy.guard.ratelimit_redis import RedisLimiter

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


@pytest.mark.redis
def test_a_retried_release_whose_first_reply_was_lost_charges_once() -> None:
    from .test_redis import RedisServer, require_redis_server

    require_redis_server()
    redis = RedisServer()
    redis.start()

    async def scenario() -> str:
        limiter = RedisLimiter.from_url(redis.url)
        p = Principal("lossy", Limits(tokens_per_minute=100))
        first = await limiter.admit(p, Cost(tokens=80))
        real = limiter._finish
        replies = 0

        async def reply_lost_once(keys: list[str], args: list[Any]) -> Any:
            # Redis ran the release, but its answer never came back (a socket timeout):
            # the limiter cannot tell, and tries again.
            nonlocal replies
            result = await real(keys=keys, args=args)
            replies += 1
            if replies == 1:
                raise TimeoutError("the reply was lost")
            return result

        limiter._finish = reply_lost_once
        await limiter.finish(first, 25)  # llama.cpp used 25 tokens
        assert replies == 2
        second = await limiter.admit(p, Cost(tokens=30))
        await limiter.finish(second, 0)
        await limiter.close()
        return second.headers["x-ratelimit-remaining-tokens"]

    try:
        remaining = asyncio.run(scenario())
    finally:
        redis.stop()
    assert remaining == str(100 - 25 - 30)  # the 25 counted once, not once per attempt
