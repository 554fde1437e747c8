"""Two real llama-servers (SmolLM2, 1 slot each) behind one gateway (`--routing affinity`,
the default): every turn of a conversation goes back to the server that holds its prompt in
its cache, so llama.cpp re-reads only the new tail; distinct conversations use both servers.

The evidence comes from llama.cpp itself, not from the gateway: each server runs with
`--metrics`, whose counters `llamacpp:prompt_tokens_total` (prompt tokens evaluated) and
`llamacpp:prompt_tokens_cached_total` (prompt tokens served from the slot's cache) tell,
between two requests sent one after the other, which server did the work and how much of
the prompt it found cached (together they add up to the prompt's tokens, the `usage`
the gateway reports).
"""

from __future__ import annotations

import itertools
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import UNLIMITED_KEY

from .conftest import (
    Service,
    child_env,
    console_script,
    http_json,
    llama_model,
    llama_server_argv,
    require_llama_files,
    sdk_client,
    start_service,
)

pytestmark = pytest.mark.e2e

METRICS_DEADLINE = 30.0  # seconds for llama.cpp's counters to show a finished request
SCHEDULE = [0, 1, 0, 0, 1, 1]  # conversation A, B, A, A, B, B: three turns each
# Two conversations with their own system prompts (several 256-byte affinity blocks each);
# the same system prompt would be a shared prefix, whose tie-break keeps idle servers'
# conversations together on purpose (docs/routing.md).
SYSTEMS = [
    "You are a ship's navigator on a long voyage across the northern sea. "
    "Answer every question about the voyage, the weather, the stars and the crew in one "
    "short sentence, in plain words, without lists. " * 3,
    "You are a gardener who keeps an old walled garden with fruit trees, herbs and bees. "
    "Answer every question about plants, soil, seasons and tools in one short sentence, "
    "in plain words, without lists. " * 3,
]
QUESTIONS = ["What do you see today?", "And what comes next?", "Why is that?"]


@dataclass
class Counters:
    """One server's prompt counters: evaluated now, and reused from its cache."""

    evaluated: int
    cached: int


def counters(server: Service) -> Counters:
    """llama-server's /metrics prompt counters."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:prompt_tokens"):
            name, _, value = line.partition(" ")
            values[name] = int(float(value))
    return Counters(
        values["llamacpp:prompt_tokens_total"], values["llamacpp:prompt_tokens_cached_total"]
    )


def llama_argv(binary: Path, model: Path, port: int) -> list[str]:
    """One small, fast server: 1 slot, a small context, 1 thread (two share 2 cores)."""
    return llama_server_argv(binary, model, port, 1, "-t", "1", "--metrics", "--slots")


@pytest.fixture(scope="module")
def llama_pair(request: pytest.FixtureRequest, e2e_logs: Path) -> Iterator[list[Service]]:
    """Two llama-servers of the SmolLM2 model."""
    binary, model = require_llama_files(llama_model())
    servers: list[Service] = []
    try:
        for i in range(2):
            servers.append(
                start_service(
                    request.config,
                    f"llama-server-route{i}",
                    lambda port: llama_argv(binary, model, port),
                    "/health",
                    e2e_logs,
                    timeout=180,
                )
            )
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def gateway(
    request: pytest.FixtureRequest, llama_pair: list[Service], e2e_logs: Path
) -> Iterator[Service]:
    """The gateway process in front of both servers, through its console script."""
    script = console_script()

    def argv(port: int) -> list[str]:
        servers = [arg for s in llama_pair for arg in ("--llamacpp-server", s.url)]
        return [
            script,
            *servers,
            "--routing",
            "affinity",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--shutdown-timeout",
            "5",
        ]

    service = start_service(
        request.config,
        "proxy-route",
        argv,
        "/health/ready",
        e2e_logs,
        timeout=30,
        env=child_env(UNLIMITED_API_KEY=UNLIMITED_KEY),
    )
    yield service
    service.stop()


@dataclass
class Turn:
    """Where one request ran and what llama.cpp did with its prompt."""

    server: int
    prompt_tokens: int
    evaluated: int
    cached: int


def run_turn(
    client: openai.OpenAI, servers: list[Service], messages: list[dict[str, Any]]
) -> tuple[Turn, str]:
    """Send one chat turn (nothing else runs at the same time) and read, from the servers'
    counters, which one evaluated it and how much of its prompt came from the cache."""
    before = [counters(s) for s in servers]
    completion = client.chat.completions.create(
        model="smollm2",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0.0,
    )
    assert completion.usage is not None
    prompt_tokens = completion.usage.prompt_tokens
    answer = completion.choices[0].message.content or ""
    # llama.cpp counts a request when it finishes it, before the gateway relays the answer;
    # the poll only guards against a counter read racing that bookkeeping.
    deadline = time.monotonic() + METRICS_DEADLINE
    while True:
        after = [counters(s) for s in servers]
        deltas = [
            Counters(a.evaluated - b.evaluated, a.cached - b.cached)
            for a, b in zip(after, before, strict=True)
        ]
        worked = [i for i, d in enumerate(deltas) if d.evaluated or d.cached]
        if len(worked) == 1 and deltas[worked[0]].evaluated + deltas[worked[0]].cached >= (
            prompt_tokens
        ):
            d = deltas[worked[0]]
            return Turn(worked[0], prompt_tokens, d.evaluated, d.cached), answer
        assert len(worked) <= 1, f"one request was evaluated by two servers: {deltas}"
        assert time.monotonic() < deadline, (
            f"no server's /metrics showed the {prompt_tokens}-token prompt: {deltas}"
        )
        time.sleep(0.05)


def test_turns_of_a_conversation_reuse_one_servers_prompt_cache(
    gateway: Service, llama_pair: list[Service]
) -> None:
    client = sdk_client(gateway, UNLIMITED_KEY)
    conversations: list[list[dict[str, Any]]] = [
        [{"role": "system", "content": system}] for system in SYSTEMS
    ]
    turns: list[list[Turn]] = [[], []]
    # Two users taking turns unevenly, so that no fixed rotation over the servers could
    # pass for affinity (round-robin would send A's third turn to B's server).
    for c in SCHEDULE:
        messages = conversations[c]
        messages.append({"role": "user", "content": QUESTIONS[len(turns[c])]})
        turn, answer = run_turn(client, llama_pair, messages)
        messages.append({"role": "assistant", "content": answer})
        turns[c].append(turn)

    summary = {f"conversation {c}": turns[c] for c in range(2)}
    # Distinct conversations spread over both servers.
    assert {turns[0][0].server, turns[1][0].server} == {0, 1}, summary
    for c in range(2):
        first = turns[c][0]
        assert first.cached < first.prompt_tokens // 2, summary  # a cold start
        for previous, turn in itertools.pairwise(turns[c]):
            # Turn N+1 on the server of turn N, reusing the whole prompt of turn N from the
            # cache (one token of slack: where the cached prompt ends, llama.cpp may re-read
            # the last token), and evaluating only the new tail.
            assert turn.server == first.server, summary
            assert turn.cached >= previous.prompt_tokens - 1, summary
            assert turn.evaluated <= turn.prompt_tokens - previous.prompt_tokens + 1, summary

    # The gateway saw it too: both servers ready, one slot each.
    ready = http_json(gateway.url + "/health/ready", timeout=5)
    servers = next(iter(ready["models"].values()))["servers"]
    assert [(s["status"], s["slots_total"]) for s in servers] == [("ready", 1), ("ready", 1)]
