"""Client input that llama-server (b11434) cannot survive, refused by the gateway with a 400
before anything reaches it (front-door bounds on llama.cpp's extensions, and
render/grammar_guard.py for raw grammars). Each was measured against the real llama-server:
the measurements are in docs/compatibility.md; tests/e2e/test_openai_sdk.py sends the ones
that would crash it through the gateway to a real one."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from llamacpp_proxy.render.grammar_guard import grammar_problem

from .conftest import UNLIMITED_KEY, Stack

AUTH = {"Authorization": f"Bearer {UNLIMITED_KEY}"}
CHAT = [{"role": "user", "content": "hi"}]


def nested_groups(levels: int) -> str:
    return "root ::= " + "(" * levels + '"a"' + ")" * levels


def rule_chain(rules: int) -> str:
    return (
        "root ::= r1\n"
        + "".join(f"r{i} ::= r{i + 1}\n" for i in range(1, rules - 1))
        + (f'r{rules - 1} ::= "a"\n')
    )


HAZARDS = [
    # (extra body fields, param, words in the message)
    ({"repeat_last_n": 2**31 - 1, "repeat_penalty": 1.1}, "repeat_last_n", "between -1 and"),
    (
        {"dry_penalty_last_n": 2**31 - 1, "dry_multiplier": 0.8},
        "dry_penalty_last_n",
        "between -1 and",
    ),
    ({"samplers": ["penalties"] * 3000}, "samplers", "maximum length 16"),
    (
        {"dry_multiplier": 0.8, "dry_sequence_breakers": [f"b{i}" for i in range(1000)]},
        "dry_sequence_breakers",
        "maximum length 32",
    ),
    ({"grammar": nested_groups(20000)}, "grammar", "levels deep"),
    ({"grammar": "root ::= " + "(" * 20000}, "grammar", "levels deep"),  # never closed
    ({"grammar": rule_chain(100000)}, "grammar", "characters long"),
    # a long literal copied once per count: 855 MB at once, 640 MB kept after the answer
    ({"grammar": 'root ::= "' + "a" * 30000 + '"{2000}'}, "grammar", "grammar elements"),
    ({"grammar": "root ::= " + '"a" ' * 200_000}, "grammar", "characters long"),
    # read in many ways at once: no token in 15 s, the core busy after the client left
    ({"grammar": 'root ::= ("a"?){0,300}'}, "grammar", "ways at once"),
    # 9 s of a core for 100 tokens (2 s unambiguous)
    ({"grammar": 'root ::= ("a" | "aa"){0,2000}'}, "grammar", "ways at once"),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("extra", "param", "words"), HAZARDS, ids=[f"{h[1]}-{i}" for i, h in enumerate(HAZARDS)]
)
def test_what_would_crash_or_hang_llamacpp_is_a_400_and_never_sent(
    stack: Stack, path: str, extra: dict[str, Any], param: str, words: str
) -> None:
    """Regression: each went to llama.cpp, which was OOM-killed (the token windows: 8 and
    17 GB allocated at once), spent minutes of a core on one request before its first token
    (samplers, breakers), or crashed on a stack overflow (grammars)."""
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
    with httpx.Client(base_url=stack.url, headers=AUTH) as client:
        r = client.post(path, content=json.dumps({**body, "max_tokens": 4, **extra}))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param, error
        assert words in error["message"], error
        assert not stack.fake.requests  # never reached llama.cpp
        ok = client.post(path, content=json.dumps({**body, "max_tokens": 4}))
        assert ok.status_code == 200  # the same connection goes on serving


def test_values_at_the_bounds_still_reach_llamacpp(stack: Stack) -> None:
    extra = {
        "repeat_last_n": 2**20,
        "dry_penalty_last_n": -1,
        "samplers": ["top_k"] * 16,
        "dry_sequence_breakers": ["\n"] * 32,
        "grammar": nested_groups(256),
    }
    with httpx.Client(base_url=stack.url, headers=AUTH) as client:
        r = client.post("/v1/completions", content=json.dumps({"prompt": "hi", **extra}))
        assert r.status_code == 200, r.text
    sent = stack.fake.requests[0]
    assert {name: sent[name] for name in extra} == extra


@pytest.mark.parametrize(
    "grammar",
    [
        nested_groups(256),
        rule_chain(4096),
        'root ::= "' + "(" * 1000 + '"',  # parentheses in a literal are text
        "root ::= [" + "(" * 1000 + "]",  # and in a class
        'root ::= "a" # ' + "(" * 1000 + "\n",  # and in a comment
        "root ::= " + '"::=" ' * 5000,  # as is "::=" in a literal
    ],
)
def test_grammars_within_the_bounds_pass(grammar: str) -> None:
    assert grammar_problem(grammar) is None


def test_a_grammar_past_its_size_bound_is_refused_before_it_is_analysed() -> None:
    """The analysis (render/gbnf.py) runs on the event loop, about 0.6 ms a KiB: a 4 MB
    grammar held every client for seconds. Regression: an 800 KB grammar took 0.87 s."""
    assert grammar_problem("root ::= " + '"a" ' * 16_000) is None  # 64 KB
    problem = grammar_problem("root ::= " + '"a" ' * 17_000)
    assert problem is not None and "at most 65536 are taken" in problem
    short_rules = "".join(f"r{i}::=r{i + 1}\n" for i in range(4100)) + 'r4100::="a"\n'
    assert len(short_rules) < 65536
    rules = grammar_problem(short_rules)
    assert rules is not None and "more than 4096 rules" in rules


@pytest.mark.parametrize(
    ("grammar", "refused"),
    [
        ('root ::= "' + "a" * 600 + '"{2000}', True),  # 1,200,000 elements
        ('root ::= "' + "a" * 400 + '"{2000}', False),
        ('root ::= ("' + "a" * 400 + '"){2000}', False),  # a group: one reference per copy
        ('root ::= [a-z0-9]{1,2000} ("x"{0,2000}){0,2000}', False),
        ('root ::= "' + "ab" * 200 + '"{1000}{3}', True),  # a repetition of a repetition
        ('root ::= x{2000}\nx ::= "' + "a" * 30000 + '"', False),  # a reference, not a copy
    ],
)
def test_repetitions_are_bounded_by_what_llamacpp_writes_out(grammar: str, refused: bool) -> None:
    problem = grammar_problem(grammar)
    assert (problem is not None and "grammar elements" in problem) is refused, problem
