"""--cors-allow-origins: a browser page on an allowed origin can call the API (preflight
answered without a key, streams and errors readable); any other origin gets no CORS headers."""

from __future__ import annotations

from collections.abc import Callable

from .conftest import UNLIMITED_KEY, Stack

ALLOWED = "https://app.example"
REFUSED = "https://evil.example"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_preflight_from_an_allowed_origin_needs_no_key(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(cors_allow_origins=(ALLOWED,))
    r = stack.http.options(
        "/v1/chat/completions",
        headers={
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os, x-stainless-retry-count, x-other",
        },
    )
    assert r.status_code == 204, r.text
    assert r.headers["Access-Control-Allow-Origin"] == ALLOWED
    allowed = [h.strip() for h in r.headers["Access-Control-Allow-Headers"].split(",")]
    assert allowed == ["authorization", "content-type", "x-stainless-os", "x-stainless-retry-count"]
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    # The same kept-alive connection then carries the real request.
    real = stack.http.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={"Origin": ALLOWED, "Authorization": f"Bearer {UNLIMITED_KEY}"},
    )
    assert real.status_code == 200
    assert real.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "X-Request-Id" in real.headers["Access-Control-Expose-Headers"]


def test_streams_and_errors_carry_the_headers_for_an_allowed_origin(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(cors_allow_origins=(ALLOWED, "https://other.example"))
    headers = {"Origin": ALLOWED, "Authorization": f"Bearer {UNLIMITED_KEY}"}
    with stack.http.stream(
        "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    ) as r:
        assert r.status_code == 200
        assert r.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert "data: [DONE]" in r.read().decode()
    bad_key = stack.http.get(
        "/v1/models", headers={"Origin": ALLOWED, "Authorization": "Bearer no"}
    )
    assert bad_key.status_code == 401  # the page can read why
    assert bad_key.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert stack.http.get("/v1/models", headers=headers).headers["Vary"] == "Origin"


def test_a_refused_origin_gets_no_cors_headers(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(cors_allow_origins=(ALLOWED,))
    r = stack.http.options(
        "/v1/chat/completions",
        headers={"Origin": REFUSED, "Access-Control-Request-Method": "POST"},
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "cors_refused"
    assert "Access-Control-Allow-Origin" not in r.headers
    real = stack.http.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={"Origin": REFUSED, "Authorization": f"Bearer {UNLIMITED_KEY}"},
    )
    assert real.status_code == 200  # not a browser: CORS does not stop it, the key does
    assert "Access-Control-Allow-Origin" not in real.headers
    # A preflight never gets past without a key where no key was needed before: the key
    # check still applies to every non-preflight OPTIONS.
    assert stack.http.options("/v1/models", headers={"Origin": ALLOWED}).status_code == 401


def test_star_allows_any_origin(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(cors_allow_origins=("*",))
    r = stack.http.options(
        "/v1/models", headers={"Origin": REFUSED, "Access-Control-Request-Method": "GET"}
    )
    assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == "*"


def test_without_the_option_nothing_changes(stack: Stack) -> None:
    r = stack.http.options(
        "/v1/chat/completions",
        headers={"Origin": ALLOWED, "Access-Control-Request-Method": "POST"},
    )
    assert r.status_code >= 400
    assert "Access-Control-Allow-Origin" not in r.headers
    ok = stack.http.get(
        "/v1/models", headers={"Origin": ALLOWED, "Authorization": f"Bearer {UNLIMITED_KEY}"}
    )
    assert ok.status_code == 200 and "Access-Control-Allow-Origin" not in ok.headers
