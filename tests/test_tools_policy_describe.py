"""The "describe" tools policy: tools a chat template cannot express are written into the
system prompt and the model's calls parsed back, through both front doors (the official
`openai` and `anthropic` SDKs on kept-alive clients) into the fake llama.cpp, whose ChatML
template has no place for tools."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from llamacpp_proxy.render.tool_calls import parse_tool_calls
from llamacpp_proxy.render.tools_describe import (
    DescribedCallFilter,
    describe_tools,
    described_conversation,
)
from llamacpp_proxy.route.pools import UpstreamsFileError, load_upstreams_file

from .conftest import UNLIMITED_KEY, Stack
from .fake_llamacpp import prompt_text

WEATHER: Any = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
OPENAI_WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": WEATHER["input_schema"],
    },
}
# The text the gateway writes into the system prompt for WEATHER: the documented format
# (docs/compatibility.md, "Tools a chat template cannot express"), byte for byte.
DESCRIPTION = (
    "You can call tools (functions) to help answer. Each tool is listed with its name, what "
    "it does, and the JSON schema of its arguments.\n"
    "\n"
    "## get_weather\n"
    "Current weather in a city\n"
    'Arguments schema: {"type":"object","properties":{"city":{"type":"string"}},'
    '"required":["city"],"additionalProperties":false}\n'
    "\n"
    "To call a tool, write exactly one block per call, in this form, with the arguments as a "
    "JSON object that follows the tool's schema:\n"
    '<tool_call>{"name": "TOOL_NAME", "arguments": {"ARGUMENT": "VALUE"}}</tool_call>\n'
    "You may write a short text before the block; write nothing after the last block, and "
    "wait for the results. Each result comes back in the next user message as "
    '<tool_result name="TOOL_NAME">…</tool_result>.\n'
)
AUTO = "If no tool is needed, answer in plain text without a block."
# What the model answers: text, then a call in the described format, split across reads
# the way tokens come (the marker itself cut in two).
CALL_TOKENS = [
    "Let me check.",
    "\n<tool",
    "_call>",
    '{"name": "get_weather", ',
    '"arguments": {"city": "Paris"}}',
    "</tool_call>",
]
MALFORMED_TOKENS = ["Let me check.", "\n<tool_call>", '{"name": "get_weather", "arguments": ']
ASK: Any = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture
def described(make_stack: Any) -> Stack:
    stack: Stack = make_stack(tools_policy="describe")
    return stack


@pytest.fixture
def claude(described: Stack) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=described.url, api_key=UNLIMITED_KEY, max_retries=0, timeout=20
    ) as client:
        yield client


@pytest.fixture
def gpt(described: Stack) -> Iterator[openai.OpenAI]:
    with described.client() as client:
        yield client


def sent(stack: Stack) -> str:
    """The prompt llama.cpp last received, as text (content holding `<tool_call>` goes as
    plain-text token ids, never as a control token: render/control_tokens.py)."""
    return prompt_text(stack.fake.requests[-1]["prompt"])


def chatml(*turns: tuple[str, str]) -> str:
    """The fake's ChatML prompt for these (role, content) turns, ready for the answer."""
    body = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return body + "<|im_start|>assistant\n"


# -- the described prompt ---------------------------------------------------------------------


def test_described_prompt_reaches_llamacpp_exactly(
    described: Stack, claude: anthropic.Anthropic, gpt: openai.OpenAI
) -> None:
    raw = claude.messages.with_raw_response.create(
        model="m",
        max_tokens=50,
        system="Be brief.",
        tools=[WEATHER],
        messages=ASK,
    )
    assert raw.headers["x-tools-described"] == "1"
    assert sent(described) == chatml(
        ("system", f"Be brief.\n\n{DESCRIPTION}{AUTO}"), ("user", "Weather in Paris?")
    )
    # Without a system prompt, the description is one; the OpenAI door renders the same.
    chat = gpt.chat.completions.with_raw_response.create(
        model="m",
        messages=ASK,
        tools=[OPENAI_WEATHER],
    )
    assert chat.headers["x-tools-described"] == "1"
    assert sent(described) == chatml(
        ("system", f"{DESCRIPTION}{AUTO}"), ("user", "Weather in Paris?")
    )
    # No tools: no description, no header, the prompt as ever.
    plain = gpt.chat.completions.with_raw_response.create(model="m", messages=ASK)
    assert "x-tools-described" not in plain.headers
    assert sent(described) == chatml(("user", "Weather in Paris?"))


def test_tool_choice_none_describes_nothing_and_forced_choices_say_so(
    described: Stack, claude: anthropic.Anthropic
) -> None:
    def create(tool_choice: Any) -> Any:
        return claude.messages.with_raw_response.create(
            model="m",
            max_tokens=50,
            tools=[WEATHER],
            tool_choice=tool_choice,
            messages=ASK,
        )

    none = create({"type": "none"})
    assert "x-tools-described" not in none.headers
    assert sent(described) == chatml(("user", "Weather in Paris?"))
    # Forced: the instruction says so, and llama.cpp's json_schema constraint (the one a
    # template with tools gets) makes the answer a call of the offered tool(s).
    create({"type": "any"})
    body = described.fake.requests[-1]
    assert "You must call one of these tools now" in sent(described)
    assert body["json_schema"]["properties"]["name"] == {"const": "get_weather"}
    create({"type": "tool", "name": "get_weather"})
    body = described.fake.requests[-1]
    assert "You must call the tool get_weather now" in sent(described)
    assert body["json_schema"]["properties"]["name"] == {"const": "get_weather"}


def test_forced_call_answer_is_a_tool_call(described: Stack, claude: anthropic.Anthropic) -> None:
    # What the json_schema constraint makes the model write: the bare call object.
    described.fake.script.tokens = ['{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}']
    for stream in (False, True):
        kwargs: Any = {"model": "m", "max_tokens": 50, "tools": [WEATHER], "messages": ASK}
        kwargs["tool_choice"] = {"type": "any"}
        if stream:
            with claude.messages.stream(**kwargs) as events:
                message = events.get_final_message()
        else:
            message = claude.messages.create(**kwargs)
        assert message.stop_reason == "tool_use"
        [block] = message.content
        assert block.type == "tool_use" and block.input == {"city": "Oslo"}


# -- calls parsed back ------------------------------------------------------------------------


def test_described_call_comes_back_as_tool_use(
    described: Stack, claude: anthropic.Anthropic
) -> None:
    described.fake.script.tokens = list(CALL_TOKENS)
    kwargs: Any = {"model": "m", "max_tokens": 50, "tools": [WEATHER], "messages": ASK}
    message = claude.messages.create(**kwargs)
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "Let me check."
    tool_use = message.content[1]
    assert tool_use.type == "tool_use" and tool_use.name == "get_weather"
    assert tool_use.input == {"city": "Paris"} and tool_use.id.startswith("toolu_")

    with claude.messages.stream(**kwargs) as stream:
        deltas = [e for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text.strip() == "Let me check."  # type: ignore[union-attr]
    assert final.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert [d.delta.type for d in deltas][-1] == "input_json_delta"
    streamed_text = "".join(d.delta.text for d in deltas if d.delta.type == "text_delta")
    assert "<tool" not in streamed_text  # the held marker never leaked as text


def test_described_call_comes_back_as_openai_tool_calls(
    described: Stack, gpt: openai.OpenAI
) -> None:
    described.fake.script.tokens = list(CALL_TOKENS)
    completion = gpt.chat.completions.create(
        model="m",
        messages=ASK,
        tools=[OPENAI_WEATHER],
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]

    chunks = list(
        gpt.chat.completions.create(
            model="m",
            messages=ASK,
            tools=[OPENAI_WEATHER],
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text.strip() == "Let me check."
    assert [tc.function.name for tc in calls] == ["get_weather"]  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[arg-type, union-attr]
    assert reasons[-1] == "tool_calls"


TWO_CALLS = [
    "Checking both.",
    '\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    '\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
]
ONE_AT_MOST = "Call at most one tool in each answer: write one block, then wait for its result."


def test_parallel_calls_off_keeps_the_first_call_in_every_front_door(
    described: Stack, claude: anthropic.Anthropic, gpt: openai.OpenAI
) -> None:
    """`parallel_tool_calls: false` (OpenAI chat and Responses) and Anthropic's
    `disable_parallel_tool_use` tell the model to call one tool at most, and a second call
    it writes anyway never reaches a client that said it cannot take one."""
    described.fake.script.tokens = list(TWO_CALLS)
    # By default both calls come back (and the prompt says nothing about one at most).
    both = gpt.chat.completions.create(model="m", messages=ASK, tools=[OPENAI_WEATHER])
    assert len(both.choices[0].message.tool_calls or []) == 2
    assert ONE_AT_MOST not in sent(described)

    one = gpt.chat.completions.create(
        model="m", messages=ASK, tools=[OPENAI_WEATHER], parallel_tool_calls=False
    )
    assert ONE_AT_MOST in sent(described)
    [call] = one.choices[0].message.tool_calls or []
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert one.choices[0].finish_reason == "tool_calls"
    chunks = list(
        gpt.chat.completions.create(
            model="m",
            messages=ASK,
            tools=[OPENAI_WEATHER],
            parallel_tool_calls=False,
            stream=True,
        )
    )
    streamed = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [json.loads(tc.function.arguments) for tc in streamed] == [{"city": "Paris"}]  # type: ignore[arg-type, union-attr]

    kwargs: Any = {
        "model": "m",
        "max_tokens": 50,
        "tools": [WEATHER],
        "messages": ASK,
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    }
    message = claude.messages.create(**kwargs)
    assert [b.input for b in message.content if b.type == "tool_use"] == [{"city": "Paris"}]
    assert ONE_AT_MOST in sent(described)
    with claude.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert [b.input for b in final.content if b.type == "tool_use"] == [{"city": "Paris"}]

    response = gpt.responses.create(
        model="m",
        input="Weather in Paris?",
        tools=[{"type": "function", **OPENAI_WEATHER["function"]}],
        parallel_tool_calls=False,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Paris"}]  # type: ignore[union-attr]
    assert response.parallel_tool_calls is False


def test_malformed_described_call_stays_text(
    described: Stack, claude: anthropic.Anthropic, gpt: openai.OpenAI
) -> None:
    described.fake.script.tokens = list(MALFORMED_TOKENS)
    whole = "".join(MALFORMED_TOKENS)
    kwargs: Any = {"model": "m", "max_tokens": 50, "tools": [WEATHER], "messages": ASK}
    message = claude.messages.create(**kwargs)
    assert message.stop_reason == "end_turn"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == whole
    with claude.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn"
    assert "".join(b.text for b in final.content if b.type == "text") == whole

    completion = gpt.chat.completions.create(model="m", messages=ASK, tools=[OPENAI_WEATHER])
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.content == whole
    assert not completion.choices[0].message.tool_calls
    chunks = list(
        gpt.chat.completions.create(
            model="m",
            messages=ASK,
            tools=[OPENAI_WEATHER],
            stream=True,
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # A call of a tool that was not offered is not a call either.
    described.fake.script.tokens = ['<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>']
    other = claude.messages.create(**kwargs)
    assert other.stop_reason == "end_turn" and other.content[0].type == "text"


# -- the round trip with a tool result ------------------------------------------------------


def test_round_trip_with_a_tool_result(
    described: Stack, claude: anthropic.Anthropic, gpt: openai.OpenAI
) -> None:
    described.fake.script.tokens = list(CALL_TOKENS)
    first = claude.messages.create(model="m", max_tokens=50, tools=[WEATHER], messages=ASK)
    tool_use = first.content[1]
    assert tool_use.type == "tool_use"
    described.fake.script.tokens = ["It is ", "18 °C."]
    second = claude.messages.create(
        model="m",
        max_tokens=50,
        tools=[WEATHER],
        messages=[
            *ASK,
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": tool_use.id, "content": "18 °C"},
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ],
    )
    assert second.stop_reason == "end_turn" and second.content[0].text == "It is 18 °C."  # type: ignore[union-attr]
    call = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
    result = '<tool_result name="get_weather">\n18 °C\n</tool_result>'
    expected = chatml(
        ("system", f"{DESCRIPTION}{AUTO}"),
        ("user", "Weather in Paris?"),
        ("assistant", f"Let me check.\n{call}"),
        ("user", f"{result}\nAnd tomorrow?"),  # one user turn: roles still alternate
    )
    assert sent(described) == expected

    # The OpenAI door: arguments as a JSON string, the result as a tool message.
    gpt.chat.completions.create(
        model="m",
        tools=[OPENAI_WEATHER],
        messages=[
            *ASK,
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 °C"},
        ],
    )
    assert sent(described) == chatml(
        ("system", f"{DESCRIPTION}{AUTO}"),
        ("user", "Weather in Paris?"),
        ("assistant", f"Let me check.\n{call}"),
        ("user", result),
    )


# -- per model, and the size bound -----------------------------------------------------------


def test_describe_per_model_in_the_upstreams_file(
    make_stack: Any, fake: Any, tmp_path: Path
) -> None:
    upstreams = tmp_path / "upstreams.toml"
    upstreams.write_text(
        f'[models.described]\nservers = ["{fake.url}"]\ntools_policy = "describe"\n'
    )
    stack = make_stack(upstreams_file=upstreams)  # --tools-policy: the default, refuse
    assert stack.ctx.settings.tools_policy == "refuse"
    fake.script.tokens = list(CALL_TOKENS)
    with anthropic.Anthropic(
        base_url=stack.url, api_key=UNLIMITED_KEY, max_retries=0, timeout=20
    ) as client:
        message = client.messages.create(
            model="described",
            max_tokens=50,
            tools=[WEATHER],
            messages=ASK,
        )
    assert message.stop_reason == "tool_use"
    assert message.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]
    # A value the gateway does not know is refused at start, naming the three.
    upstreams.write_text(f'[models.x]\nservers = ["{fake.url}"]\ntools_policy = "guess"\n')
    with pytest.raises(UpstreamsFileError, match="refuse, drop, describe"):
        load_upstreams_file(upstreams)


def test_described_tools_over_the_context_are_a_400_in_each_shape(
    described: Stack, claude: anthropic.Anthropic, gpt: openai.OpenAI
) -> None:
    # Claude Code's 24 tools are about 76 KB of schemas; a small context cannot hold them.
    big = [
        {**WEATHER, "name": f"tool_{i}", "description": "Does a thing. " * 200} for i in range(24)
    ]
    described.fake.script.n_ctx = 8192
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model="m", max_tokens=50, tools=big, messages=ASK)  # type: ignore[arg-type]
    assert caught.value.status_code == 400
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert caught.value.body["error"]["message"].startswith("prompt is too long")  # type: ignore[index]
    openai_tools: Any = [
        {"type": "function", "function": {"name": t["name"], "description": t["description"]}}
        for t in big
    ]
    with pytest.raises(openai.BadRequestError) as too_long:
        gpt.chat.completions.create(model="m", messages=ASK, tools=openai_tools)
    assert too_long.value.code == "context_length_exceeded"
    # The description is bounded by what was sent: each schema once, compact.
    prompt_bytes = len(
        described_conversation(ASK, describe_tools(_openai(big), "auto"))[0]["content"]
    )
    assert prompt_bytes < len(json.dumps(big)) + 600
    # And the gateway keeps serving on the same connections.
    described.fake.script.n_ctx = 4096
    assert claude.messages.create(model="m", max_tokens=5, messages=ASK).content


def _openai(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                "description": t["description"],
                "parameters": t["input_schema"],
            },
        }
        for t in tools
    ]


# -- the pure pieces ------------------------------------------------------------------------


TOOLS = _openai([WEATHER])


@pytest.mark.parametrize(
    ("reads", "sent", "calls"),
    [
        (["Hi ", "there"], "Hi there", 0),
        (["a <", "b> c"], "a <b> c", 0),  # a '<' that does not become the marker is released
        (["x <tool", "box>"], "x <toolbox>", 0),
        (CALL_TOKENS, "Let me check.\n", 1),
        (["<tool_call>", '{"name": "get_weather", "arguments": {}}'], "", 1),  # no close tag
        (MALFORMED_TOKENS, "".join(MALFORMED_TOKENS), 0),
        (['{"name": "get_weather", "arguments": {}}'], "", 1),  # bare, as the forced schema
    ],
)
def test_described_call_filter(reads: list[str], sent: str, calls: int) -> None:
    f = DescribedCallFilter(TOOLS, forced=False)
    out = "".join(f.feed(r) for r in reads)
    rest, parsed = f.finish()
    assert out + rest == sent and len(parsed) == calls
    # The non-streamed parse agrees with the streamed one.
    whole = parse_tool_calls("".join(reads), TOOLS)
    assert (0 if whole is None else len(whole[1])) == calls


def test_filter_holds_only_a_possible_marker() -> None:
    f = DescribedCallFilter(TOOLS, forced=False)
    assert f.feed("Hello") == "Hello"
    assert f.feed(" wor") == " wor"  # plain text streams as it comes
    assert f.feed("ld <to") == "ld "  # "<to" may start <tool_call>
    assert f.feed("p>") == "<top>"


# -- what Claude Code's runs are checked by (tests/e2e/test_claude_code.py) ------------------


def test_streamed_message_is_in_the_ledger_as_streamed(make_stack: Any, tmp_path: Path) -> None:
    """The ledger tells a streamed request by its time to first token: /v1/messages set
    none, so Claude Code's requests (always streamed) looked non-streamed."""
    stack = make_stack(usage_db=tmp_path / "usage.db")
    with anthropic.Anthropic(
        base_url=stack.url, api_key=UNLIMITED_KEY, max_retries=0, timeout=20
    ) as client:
        client.messages.create(model="m", max_tokens=5, messages=ASK)
        with client.messages.stream(model="m", max_tokens=5, messages=ASK) as stream:
            stream.get_final_message()
    ledger = stack.ctx.usage
    assert ledger is not None
    assert stack.wait_for(lambda: ledger.recorded == 2)
    assert ledger.flush()
    with sqlite3.connect(tmp_path / "usage.db") as db:
        rows = db.execute("SELECT endpoint, status, ttft FROM usage ORDER BY time").fetchall()
    assert [(endpoint, status) for endpoint, status, _ in rows] == [("/v1/messages", 200)] * 2
    assert rows[0][2] is None and rows[1][2] is not None
