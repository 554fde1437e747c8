"""Chat templates: the built-in templates render each model's documented prompt format, and the
sandboxed environment treats message content as data and templates as untrusted code.

Every expected prompt below is written out from the model's published format (model card /
Hugging Face chat template), not pasted from a render.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from llamacpp_proxy.errors import ChatTemplateRejected, InvalidRequest
from llamacpp_proxy.render.control_tokens import mark_messages
from llamacpp_proxy.render.templates import (
    ChatTemplate,
    TemplateLoadError,
    builtin_template_names,
    load_chat_template,
)
from llamacpp_proxy.upstream.llamacpp import MixedPrompt

BUILTINS = ["chatml", "gemma3", "llama3", "mistral", "qwen2.5"]

# The BOS / EOS strings each model family's tokenizer uses.
SPECIAL_TOKENS = {
    "chatml": ("", "<|im_end|>"),
    "gemma3": ("<bos>", "<eos>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("<s>", "</s>"),
    "qwen2.5": ("", "<|im_end|>"),
}

SINGLE = [{"role": "user", "content": "Hello!"}]

MULTI_TURN = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}

TOOL_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What's the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
]


def render(name: str, messages: list[dict], **kwargs) -> str:
    bos, eos = SPECIAL_TOKENS[name]
    return load_chat_template(name).render(messages, bos_token=bos, eos_token=eos, **kwargs)


# --- built-in templates: expected prompts --------------------------------------------------

EXPECTED_SINGLE = {
    "chatml": "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    # Gemma: BOS first (stripped by render), `assistant` is spoken as `model`.
    "gemma3": "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n",
    # Llama 3.1: the system header (knowledge cutoff + date) is always present.
    "llama3": (
        "<|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n"
        "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    # Mistral tokenizer v1: "<s> [INST] user [/INST]"; the model answers after [/INST].
    "mistral": " [INST] Hello! [/INST]",
    # Qwen2.5 adds its default system prompt when there is none.
    "qwen2.5": (
        "<|im_start|>system\n"
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
}

EXPECTED_MULTI_TURN = {
    "chatml": (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    # Gemma has no system turn: the system text opens the first user turn.
    "gemma3": (
        "<start_of_turn>user\n"
        "You are a terse assistant.\n\n"
        "What is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis.<end_of_turn>\n"
        "<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    "llama3": (
        "<|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n"
        "You are a terse assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd of Italy?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    # System prompt prepended to the FIRST user message; each assistant turn ends with EOS.
    "mistral": (
        " [INST] You are a terse assistant.\n\nWhat is the capital of France? [/INST]"
        " Paris.</s>"
        " [INST] And of Italy? [/INST]"
    ),
    "qwen2.5": (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
}


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_single_user_message(name: str) -> None:
    assert render(name, SINGLE) == EXPECTED_SINGLE[name]


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_multi_turn_with_system_prompt(name: str) -> None:
    assert render(name, MULTI_TURN) == EXPECTED_MULTI_TURN[name]


def test_chatml_without_generation_prompt() -> None:
    prompt = render("chatml", SINGLE, add_generation_prompt=False)
    assert prompt == "<|im_start|>user\nHello!<|im_end|>\n"


def test_gemma3_trims_message_content() -> None:
    messages = [{"role": "user", "content": "  padded \n"}]
    assert render("gemma3", messages) == (
        "<start_of_turn>user\npadded<end_of_turn>\n<start_of_turn>model\n"
    )


def test_llama3_tool_call_conversation() -> None:
    # Tools go into the first user turn (tools_in_user_message defaults to true), each tool
    # as tojson(indent=4); the call is rendered as {"name", "parameters"}; the tool result
    # comes back in an `ipython` turn. A string result is JSON-quoted, because the published
    # template tests `content is iterable`, which a string is.
    prompt = render("llama3", TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert prompt == (
        "<|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\n"
        "Cutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n"
        "You are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call "
        "with its proper arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument '
        "name and its value}.Do not use variables.\n\n"
        "{\n"
        '    "type": "function",\n'
        '    "function": {\n'
        '        "name": "get_weather",\n'
        '        "description": "Get the current weather for a city",\n'
        '        "parameters": {\n'
        '            "type": "object",\n'
        '            "properties": {\n'
        '                "city": {\n'
        '                    "type": "string",\n'
        '                    "description": "City name"\n'
        "                }\n"
        "            },\n"
        '            "required": [\n'
        '                "city"\n'
        "            ]\n"
        "        }\n"
        "    }\n"
        "}\n\n"
        "What's the weather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n"
        '"18 degrees and sunny"<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama3_rejects_parallel_tool_calls() -> None:
    call = TOOL_CONVERSATION[2]["tool_calls"][0]
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [call, call]},
    ]
    with pytest.raises(ChatTemplateRejected, match="single tool-calls"):
        render("llama3", messages, tools=[WEATHER_TOOL])


def test_qwen25_tool_call_conversation() -> None:
    prompt = render("qwen2.5", TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert prompt == (
        "<|im_start|>system\n"
        "You are a helpful assistant.\n\n"
        "# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        "<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", '
        '"description": "Get the current weather for a city", "parameters": '
        '{"type": "object", "properties": {"city": {"type": "string", '
        '"description": "City name"}}, "required": ["city"]}}}\n'
        "</tools>\n\n"
        "For each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n"
        "<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\nWhat's the weather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n"
        "<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n"
        "<tool_response>\n18 degrees and sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_qwen25_parallel_tool_results_share_one_user_turn() -> None:
    calls = [
        {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": city}},
        }
        for i, city in enumerate(["Paris", "Rome"])
    ]
    messages = [
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_0", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_1", "content": "24C"},
    ]
    prompt = render("qwen2.5", messages, tools=[WEATHER_TOOL])
    assert prompt.endswith(
        "<|im_start|>user\nParis and Rome?<|im_end|>\n"
        "<|im_start|>assistant\nChecking both.\n"
        "<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call>\n"
        "<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n"
        "<tool_response>\n18C\n</tool_response>\n"
        "<tool_response>\n24C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # No system message: the tools block follows Qwen's default system prompt.
    assert prompt.startswith(
        "<|im_start|>system\n"
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
    )


def test_only_tool_templates_declare_tool_use() -> None:
    uses_tools = {name: load_chat_template(name).uses_tools for name in BUILTINS}
    assert uses_tools == {
        "chatml": False,
        "gemma3": False,
        "llama3": True,
        "mistral": False,
        "qwen2.5": True,
    }


# --- role alternation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "assistant", "content": "a"}],
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "assistant", "content": "c"},
        ],
    ],
)
def test_mistral_rejects_non_alternating_roles(messages: list[dict]) -> None:
    with pytest.raises(ChatTemplateRejected) as info:
        render("mistral", messages)
    assert info.value.message == (
        "After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/..."
    )
    assert info.value.status == 400


def test_mistral_rejects_tool_role() -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "tool", "content": "b"},
    ]
    with pytest.raises(ChatTemplateRejected, match="Only user and assistant roles"):
        render("mistral", messages)


def test_gemma3_rejects_non_alternating_roles() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateRejected, match="roles must alternate"):
        render("gemma3", messages)


# --- loading --------------------------------------------------------------------------------


def test_builtin_template_names_lists_all_five() -> None:
    assert builtin_template_names() == BUILTINS


def test_load_builtin_by_name() -> None:
    template = load_chat_template("gemma3")
    assert template.origin == "'gemma3' (built in)"
    assert "<start_of_turn>" in template.source
    assert template.render(SINGLE, bos_token="<bos>") == EXPECTED_SINGLE["gemma3"]


def test_load_template_from_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    template = load_chat_template(str(path))
    assert template.origin == str(path)
    assert template.render(SINGLE) == "[user] Hello!\n"


def test_load_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-template.jinja"
    with pytest.raises(TemplateLoadError) as info:
        load_chat_template(str(missing))
    message = str(info.value)
    assert str(missing) in message
    assert "does not exist" in message
    assert "gemma3" in message  # lists the built-in names as alternatives


def test_unknown_builtin_name_is_treated_as_missing_path() -> None:
    with pytest.raises(TemplateLoadError, match="no-such-builtin"):
        load_chat_template("no-such-builtin")


def test_syntax_error_names_origin_and_line() -> None:
    source = "{# fine #}\n{% for m in messages %}\n{{ m.content }\n{% endfor %}\n"
    with pytest.raises(TemplateLoadError) as info:
        ChatTemplate(source, "broken.jinja")
    message = str(info.value)
    assert "broken.jinja" in message
    assert "line 3" in message


def test_syntax_error_in_file_names_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "unclosed.jinja"
    path.write_text("{% for m in messages %}\n{{ m.content }}\n")
    with pytest.raises(TemplateLoadError) as info:
        load_chat_template(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "line 2" in message


# --- raise_exception and the sandbox --------------------------------------------------------


def test_raise_exception_becomes_chat_template_rejected() -> None:
    template = ChatTemplate(
        "{% if messages[0].role == 'system' %}"
        "{{ raise_exception('System messages are not supported by this model') }}"
        "{% endif %}ok",
        "test",
    )
    with pytest.raises(ChatTemplateRejected) as info:
        template.render([{"role": "system", "content": "x"}])
    error = info.value
    assert isinstance(error, InvalidRequest)
    assert error.status == 400
    assert error.message == "System messages are not supported by this model"
    assert error.param == "messages"
    assert error.body()["error"] == {
        "message": "System messages are not supported by this model",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "invalid_chat_template_input",
    }
    assert template.render(SINGLE) == "ok"


@pytest.mark.parametrize("name", BUILTINS)
def test_message_content_is_never_evaluated(name: str) -> None:
    payload = "{{ 7*7 }} {% for x in range(3) %}x{% endfor %}"
    messages = [{"role": "user", "content": payload}]
    prompt = render(name, messages)
    assert payload in prompt
    assert "49" not in prompt
    assert "xxx" not in prompt


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ raise_exception.__globals__['__builtins__'] }}",
    ],
)
def test_sandbox_blocks_python_internals(source: str) -> None:
    with pytest.raises(ChatTemplateRejected) as info:
        ChatTemplate(source, "evil.jinja").render(SINGLE)
    assert "unsafe" in info.value.message
    assert info.value.status == 400


def test_sandbox_unsafe_attribute_reads_as_nothing() -> None:
    # Merely printing an unsafe attribute yields an empty undefined: nothing leaks.
    template = ChatTemplate("[{{ raise_exception.__globals__ }}]", "evil.jinja")
    assert template.render(SINGLE) == "[]"


def test_sandbox_keeps_messages_immutable() -> None:
    messages = [{"role": "user", "content": "hi"}]
    template = ChatTemplate("{% set _ = messages.append({'role': 'x'}) %}done", "evil.jinja")
    with pytest.raises(ChatTemplateRejected, match="unsafe"):
        template.render(messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_sandbox_range_limit_is_a_rejection_not_a_crash() -> None:
    template = ChatTemplate("{% for i in range(10**9) %}{% endfor %}", "huge.jinja")
    with pytest.raises(ChatTemplateRejected, match="MAX_RANGE"):
        template.render(SINGLE)


def test_template_errors_on_bad_message_shape_are_rejections() -> None:
    with pytest.raises(ChatTemplateRejected):
        render("chatml", [{"role": "user"}])  # no content: `+` on an undefined value


# --- Hugging Face globals and filters -------------------------------------------------------


def test_strftime_now_renders_current_date() -> None:
    before = str(datetime.now().year)
    year = ChatTemplate("{{ strftime_now('%Y') }}", "date").render([])
    after = str(datetime.now().year)
    assert year in {before, after}


def test_tojson_keeps_non_ascii() -> None:
    template = ChatTemplate("{{ messages[0].content | tojson }}", "json")
    assert template.render([{"role": "user", "content": "日本"}]) == '"日本"'


def test_tojson_supports_indent_like_transformers() -> None:
    template = ChatTemplate("{{ tools[0] | tojson(indent=2) }}", "json")
    assert template.render([], tools=[{"name": "天気"}]) == '{\n  "name": "天気"\n}'


def test_tojson_non_ascii_in_builtin_tool_prompt() -> None:
    tool = {"type": "function", "function": {"name": "météo", "description": "天気予報"}}
    prompt = render("qwen2.5", SINGLE, tools=[tool])
    assert '{"name": "météo", "description": "天気予報"}' in prompt


# --- BOS handling ---------------------------------------------------------------------------


def test_leading_bos_is_stripped_once() -> None:
    template = ChatTemplate("{{ bos_token }}{{ bos_token }}hi", "double-bos")
    assert template.render([], bos_token="<bos>") == "<bos>hi"


def test_bos_elsewhere_is_kept() -> None:
    template = ChatTemplate("hi{{ bos_token }}", "late-bos")
    assert template.render([], bos_token="<bos>") == "hi<bos>"


def test_empty_bos_token_strips_nothing() -> None:
    template = ChatTemplate("<bos>hi", "literal")
    assert template.render([], bos_token="") == "<bos>hi"


def test_builtin_bos_is_not_sent_twice() -> None:
    prompt = load_chat_template("gemma3").render(SINGLE, bos_token="<bos>")
    assert prompt.startswith("<start_of_turn>user\n")
    assert "<bos>" not in prompt


def test_bos_is_kept_when_llamacpp_adds_none() -> None:
    # SmolLM2 (chatml): /props names <|im_start|> as BOS, llama.cpp adds none.
    template = ChatTemplate("{{ bos_token }}system\nhi", "bos-is-first-marker")
    prompt = template.render([], bos_token="<|im_start|>", llama_adds_bos=False)
    assert prompt == "<|im_start|>system\nhi"


# --- control tokens in message content (pure part) ------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "<|im_end|>",
        "a<|eot_id|>b",
        "<start_of_turn>model",
        "x</s>",
        "[INST] hi",
        "<tool_call>",
        "<\uff5cbegin\u2581of\u2581sentence\uff5c>",
    ],
)
def test_control_token_shapes_are_detected(text: str) -> None:
    assert mark_messages([{"role": "user", "content": text}]) is not None


@pytest.mark.parametrize(
    "text", ["plain text", "a < b > c", "x <- y", "[1, 2]", "| pipes |", "if (a<b) {}"]
)
def test_plain_content_takes_the_fast_path(text: str) -> None:
    assert mark_messages([{"role": "user", "content": text}, {"role": "assistant"}]) is None


def test_marked_content_is_placed_where_a_trimming_template_puts_it() -> None:
    messages = [{"role": "user", "content": "  <end_of_turn>\nhi \n"}]
    marked = mark_messages(messages)
    assert marked is not None
    prompt = load_chat_template("gemma3").render(marked.messages, bos_token="<bos>")
    (text,) = marked.texts()
    assert text == "<end_of_turn>\nhi"
    out = marked.assemble(prompt, {text: [7, 8]}, llama_adds_bos=True)
    assert isinstance(out, MixedPrompt)
    assert out.pieces == ["<start_of_turn>user\n", 7, 8, "<end_of_turn>\n<start_of_turn>model\n"]
    assert out == "<start_of_turn>user\n<end_of_turn>\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_marker_a_template_cuts_apart_is_a_rejection() -> None:
    marked = mark_messages([{"role": "user", "content": "<|im_end|>"}])
    assert marked is not None
    prompt = ChatTemplate(
        "{% for m in messages %}{{ m['content'][:-1] }}{% endfor %}", "truncating"
    ).render(marked.messages)
    with pytest.raises(ChatTemplateRejected):
        marked.assemble(prompt, {"<|im_end|>": [1]}, llama_adds_bos=True)


def test_content_cannot_forge_a_marker() -> None:
    # A marker's nonce is fresh per request: content that imitates one stays text.
    marked = mark_messages(
        [{"role": "user", "content": "<|im_end|>"}, {"role": "user", "content": "\ue000ab.0\ue001"}]
    )
    assert marked is not None
    prompt = load_chat_template("chatml").render(marked.messages)
    out = marked.assemble(prompt, {"<|im_end|>": [5]}, llama_adds_bos=True)
    assert isinstance(out, MixedPrompt) and out.pieces.count(5) == 1
    assert "\ue000ab.0\ue001" in out
