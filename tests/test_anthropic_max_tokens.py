"""Anthropic's `max_tokens`: clients send their model's maximum, and the gateway caps it at
`--max-tokens-limit` whatever its size (docs/compatibility.md), through the official SDK."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from .conftest import UNLIMITED_KEY, Stack


@pytest.mark.parametrize("max_tokens", [2**31, 2**40, 2**63])
def test_max_tokens_past_32_bits_is_capped_not_refused(make_stack: Any, max_tokens: int) -> None:
    # A count past 2^31 - 1 was a 400 "must be an integer of at least 1, not 1099511627776":
    # wrong about what was wrong, and contrary to the documented cap.
    stack: Stack = make_stack(max_tokens_limit=8)
    with anthropic.Anthropic(
        base_url=stack.url, api_key=UNLIMITED_KEY, max_retries=0, timeout=20
    ) as client:
        message = client.messages.create(
            model="m", max_tokens=max_tokens, messages=[{"role": "user", "content": "hi"}]
        )
        assert stack.fake.requests[-1]["n_predict"] == 8
        assert message.stop_reason == "max_tokens"
        with pytest.raises(anthropic.BadRequestError, match="at least 1, not 0"):
            client.messages.create(
                model="m", max_tokens=0, messages=[{"role": "user", "content": "hi"}]
            )
