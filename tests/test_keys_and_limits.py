"""Named keys, token and concurrency limits, brute-force protection, bounded state."""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest

from llamacpp_proxy.errors import TooManyAuthFailures
from llamacpp_proxy.guard.auth import KeyFileError, Limits, build_key_store, load_key_file
from llamacpp_proxy.guard.auth_throttle import AuthFailureThrottle

from .conftest import Stack, assert_schema
from .test_api import CHAT, post, sse_events

KEYS_TOML = """
[keys.alice]
key = "sk-alice-secret-1"
requests = 100
window = 60
tokens_per_minute = 100
max_concurrent = 1

[keys.bob]
key_sha256 = "{bob_hash}"

[keys.carol]
key = "sk-carol-secret-3"
max_concurrent = 2
"""
BOB = "sk-bob-secret-2"
ALICE = "sk-alice-secret-1"
# A request a token budget can admit: max_tokens sets what is reserved for it.
X = {"prompt": "x", "max_tokens": 10}


def estimate(body: dict[str, Any]) -> int:
    """The proxy's admission estimate of a one-generation body: bytes / 4 + max_tokens."""
    return -(-len(json.dumps(body)) // 4) + body["max_tokens"]


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS_TOML.format(bob_hash=hashlib.sha256(BOB.encode()).hexdigest()))
    return path


def test_key_file_entries(key_file: Path) -> None:
    store = build_key_store(
        unlimited_key="sk-env-unlimited",
        limited_key=None,
        limited_limits=Limits(requests=1),
        key_file=key_file,
    )
    alice = store.authenticate("sk-alice-secret-1")
    assert alice is not None and alice.name == "alice"
    assert alice.limits == Limits(requests=100, window=60, tokens_per_minute=100, max_concurrent=1)
    bob = store.authenticate(BOB)
    assert bob is not None and bob.name == "bob" and bob.limits is None  # hashed, unlimited
    unlimited = store.authenticate("sk-env-unlimited")
    assert unlimited is not None and unlimited.name == "unlimited"
    assert store.authenticate("sk-nobody") is None
    assert store.names == ["alice", "bob", "carol", "unlimited"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[keys.a]\nrequests = 1\n", "exactly one of 'key' or 'key_sha256'"),
        ('[keys.a]\nkey = "short"\n', "8+ characters"),
        ('[keys.a]\nkey_sha256 = "abc"\n', "64 hex digits"),
        ('[keys.a]\nkey = "sk-aaaaaaaa"\nrequests = 0\n', "positive integer"),
        ('[keys.a]\nkey = "sk-aaaaaaaa"\nwindow = 5\n', "'window' needs 'requests'"),
        ('[keys.a]\nkey = "sk-aaaaaaaa"\nrpm = 5\n', "unknown fields: rpm"),
        ('[keys.a]\nkey = "sk-aaaaaaaa"\n[keys.b]\nkey = "sk-aaaaaaaa"\n', "share a secret"),
        ("keys = 1", "[keys.NAME]"),
        ("[keys", "not valid TOML"),
    ],
)
def test_key_file_errors_say_which_entry_and_why(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "k.toml"
    path.write_text(text)
    with pytest.raises(KeyFileError) as caught:
        load_key_file(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_named_keys_through_the_proxy(make_stack: Any, key_file: Path) -> None:
    stack = make_stack(api_keys_file=key_file)
    assert post(stack, "/v1/completions", {"prompt": "x"}, key=BOB).status_code == 200
    r = post(stack, "/v1/completions", X, key=ALICE)
    assert r.status_code == 200
    assert r.headers["x-ratelimit-limit-tokens"] == "100"
    assert r.headers["x-ratelimit-limit-requests"] == "100"


def test_token_budget_is_charged_with_llamacpp_counts(make_stack: Any, key_file: Path) -> None:
    stack = make_stack(api_keys_file=key_file)
    streamed = {**X, "stream": True}
    first = post(stack, "/v1/completions", streamed, key=ALICE)
    usage_tokens = len(stack.fake.script.tokens) + 2  # 10 generated + 2 prompt tokens
    # The estimate is reserved at admission (streamed: the headers say so too) ...
    assert first.headers["x-ratelimit-remaining-tokens"] == str(100 - estimate(streamed))
    assert stack.wait_for(lambda: stack.ctx.limiter.in_flight("alice") == 0)
    # ... and settled with llama.cpp's counts when the request ends.
    second = post(stack, "/v1/completions", X, key=ALICE)
    assert second.headers["x-ratelimit-remaining-tokens"] == str(100 - usage_tokens - estimate(X))
    assert stack.wait_for(lambda: stack.ctx.limiter.in_flight("alice") == 0)
    used = 2 * usage_tokens
    while used + estimate(X) <= 100:  # admitted while the estimate fits
        assert post(stack, "/v1/completions", X, key=ALICE).status_code == 200
        assert stack.wait_for(lambda: stack.ctx.limiter.in_flight("alice") == 0)
        used += usage_tokens
    refused = post(stack, "/v1/completions", X, key=ALICE)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "tokens_rate_limit_exceeded"
    assert refused.headers["x-ratelimit-remaining-tokens"] == str(100 - used)
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert_schema(refused.json(), "ErrorResponse")


def _hold_a_stream(stack: Stack, key: str) -> tuple[Any, Any]:
    stack.fake.script.token_delay = 0.2
    response = httpx.stream(
        "POST",
        stack.url + "/v1/completions",
        json={"prompt": "x", "stream": True, "max_tokens": 60},
        timeout=10,
        headers={"Authorization": f"Bearer {key}"},
    )
    r = response.__enter__()
    lines = r.iter_lines()
    next(lines)
    # Keep the line iterator referenced: when it is collected, httpx closes the stream.
    return response, lines


@pytest.mark.parametrize("exit_path", ["success", "upstream_error", "timeout", "disconnect"])
def test_concurrency_slot_is_released_on_every_exit_path(
    make_stack: Any, key_file: Path, exit_path: str
) -> None:
    stack = make_stack(api_keys_file=key_file, upstream_idle_timeout=0.3)
    alice = "sk-alice-secret-1"
    script = stack.fake.script
    script.tokens = ["a"]  # stay far below the token budget
    if exit_path == "success":
        assert post(stack, "/v1/completions", X, key=alice).status_code == 200
    elif exit_path == "upstream_error":
        script.fail_status = 500
        assert post(stack, "/v1/completions", X, key=alice).status_code == 502
    elif exit_path == "timeout":
        script.tokens = ["a", "b", "c"]
        script.stall_after_tokens, script.stall_seconds = 1, 2
        r = post(stack, "/v1/completions", {**X, "stream": True}, key=alice)
        assert sse_events(r)[-1]["error"]["code"] == "upstream_timeout"
    else:
        script.tokens = [f"t{i}" for i in range(50)]
        held, _lines = _hold_a_stream(stack, alice)
        busy = post(stack, "/v1/completions", X, key=alice)
        assert busy.status_code == 429
        assert busy.json()["error"]["code"] == "concurrency_limit_exceeded"
        held.__exit__(None, None, None)
    assert stack.wait_for(lambda: stack.ctx.limiter.in_flight("alice") == 0)
    stack.fake.reset()
    stack.fake.script.tokens = ["a"]
    assert post(stack, "/v1/completions", X, key=alice).status_code == 200


def test_repeated_auth_failures_are_refused_without_affecting_valid_keys(make_stack: Any) -> None:
    stack = make_stack(auth_failure_limit=5, auth_failure_window=60)
    codes = [
        post(stack, "/v1/completions", {"prompt": "x"}, key=f"sk-guess-{i}").status_code
        for i in range(8)
    ]
    assert codes == [401] * 5 + [429] * 3
    refused = post(stack, "/v1/completions", {"prompt": "x"}, key="sk-guess-x")
    assert refused.json()["error"]["code"] == "too_many_authentication_failures"
    assert int(refused.headers["retry-after"]) >= 1
    assert post(stack, "/v1/completions", {"prompt": "x"}).status_code == 200  # valid key


def test_auth_throttle_window_and_bounded_memory() -> None:
    clock = {"t": 0.0}
    throttle = AuthFailureThrottle(limit=2, window=10, max_clients=100, now=lambda: clock["t"])
    throttle.record_failure("a")
    throttle.record_failure("a")
    with pytest.raises(TooManyAuthFailures):
        throttle.check("a")
    clock["t"] = 10.01
    throttle.check("a")
    for i in range(1000):
        throttle.record_failure(f"10.0.{i // 256}.{i % 256}")
    assert throttle.tracked_addresses == 100
    clock["t"] = 100
    throttle.prune()
    assert throttle.tracked_addresses == 0


def test_auth_throttle_counts_an_ipv6_client_by_its_64_prefix() -> None:
    # A host is usually given a whole /64: counted per address, a guesser would rotate its
    # source address (2^64 of them) and never be refused, while evicting others' records.
    throttle = AuthFailureThrottle(limit=3, window=60, now=lambda: 0.0)
    for host in ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:2:abcd:1:2:3"):
        throttle.record_failure(host)
    with pytest.raises(TooManyAuthFailures):
        throttle.check("2001:db8:1:2::77")
    throttle.check("2001:db8:1:3::1")  # the next /64 is another client
    assert throttle.tracked_addresses == 1
    # IPv4, also written IPv4-mapped (a dual-stack listener's view), stays per address.
    for _ in range(3):
        throttle.record_failure("::ffff:192.0.2.7")
    with pytest.raises(TooManyAuthFailures):
        throttle.check("192.0.2.7")
    throttle.check("192.0.2.8")


def test_flood_of_random_invalid_keys_grows_no_limiter_state(make_stack: Any) -> None:
    stack = make_stack(auth_failure_limit=10_000)
    for _ in range(200):
        r = post(stack, "/v1/completions", {"prompt": "x"}, key="sk-" + secrets.token_hex(16))
        assert r.status_code == 401
    assert stack.ctx.limiter.tracked_keys == 0
    assert stack.ctx.auth_throttle.tracked_addresses == 1  # one address: 127.0.0.1
    assert stack.fake.requests == []


def test_chat_is_limited_like_text(make_stack: Any) -> None:
    stack = make_stack(rate_limit_max_requests=1)
    from .conftest import LIMITED_KEY

    assert (
        post(stack, "/v1/chat/completions", {"messages": CHAT}, key=LIMITED_KEY).status_code == 200
    )
    assert post(stack, "/v1/completions", {"prompt": "x"}, key=LIMITED_KEY).status_code == 429


@pytest.mark.parametrize("fault", ["stream_error", "drop", "disconnect"])
def test_a_broken_stream_is_charged_the_tokens_it_used(
    make_stack: Any, key_file: Path, fault: str
) -> None:
    stack = make_stack(api_keys_file=key_file)
    alice = "sk-alice-secret-1"
    stack.fake.script.tokens = [f"t{i}" for i in range(30)]
    if fault in ("stream_error", "drop"):
        if fault == "drop":
            stack.fake.script.drop_after_tokens = 5  # llama.cpp dies mid-stream
        else:
            stack.fake.script.stream_error_after_tokens = 5  # llama.cpp's `error:` event
        r = post(stack, "/v1/completions", {**X, "stream": True}, key=alice)
        assert sse_events(r)[-1]["error"]["code"] == "upstream_error"
    else:
        stack.fake.script.token_delay = 0.05
        held, lines = _hold_a_stream(stack, alice)
        for _ in range(8):
            next(lines)
        held.__exit__(None, None, None)
    assert stack.wait_for(lambda: stack.ctx.limiter.in_flight("alice") == 0)
    stack.fake.reset()
    r = post(stack, "/v1/completions", X, key=alice)
    used = 100 - estimate(X) - int(r.headers["x-ratelimit-remaining-tokens"])
    assert used >= 2 + 3  # the prompt and the tokens streamed before the break
