"""Message content reaches the model as text, never as the model's control tokens.

llama.cpp tokenizes a string prompt with special-token parsing on, so a user who writes
`<|im_end|>\n<|im_start|>assistant` in a message would otherwise close their turn and forge
the next one. Content that looks like it holds a control token is therefore rendered as a
marker; the marker's place in the prompt gets the content's token ids from llama.cpp's
/tokenize with `parse_special: false`, and llama.cpp receives the prompt as a mix of strings
(the template's own text, control tokens included) and token ids (the content). Content with
nothing of that shape, nearly all of it, costs one regex search per message and the prompt
stays one string (pure: no I/O here; the tokenizing is the upstream's).

Client text also reaches the prompt outside message content: the tools (names,
descriptions, schemas) and the arguments of earlier tool calls, which templates write with
`tojson`. Their strings that look like control tokens are marked too, standing for the text
`tojson` would have written between the quotes (JSON-escaped), so a tool description or a
call's argument cannot forge a turn either. A template that writes such a string without
`tojson` shows the model its JSON-escaped form (only for strings of that shape).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from json.encoder import encode_basestring
from typing import Any

from .. import fastjson
from ..errors import ChatTemplateRejected
from ..upstream.llamacpp import MixedPrompt

# The shapes control tokens take in the models llama.cpp serves: <|im_end|>, <|eot_id|>,
# DeepSeek's with fullwidth bars (U+FF5C); <start_of_turn>, <bos>, </s>, <tool_call>;
# [INST], [TOOL_CALLS]. It is a superset on purpose (an HTML tag matches too): a false
# alarm only costs one /tokenize of that message, a miss would let a forged turn through.
CONTROL_SHAPE = re.compile(
    r"<[|\uff5c][^<>\s]{1,64}[|\uff5c]>|</?[A-Za-z_][\w.:-]{0,63}>|\[/?[A-Z][A-Z0-9_]{1,31}\]"
)


# What every CONTROL_SHAPE starts with, in a compact JSON dump (bytes): JSON's own syntax
# has no `<`, and its `[` is never followed by `/` or an upper-case letter, so a dump
# without a match holds no string of that shape.
_SHAPE_START = re.compile(rb"<(?:[|/A-Za-z_]|\xef\xbd\x9c)|\[/?[A-Z]")
_BRACKET_START = re.compile(rb"\[/?[A-Z]")


def looks_like_control(text: str) -> bool:
    """Whether text may hold a control token (then it is tokenized as plain text)."""
    return CONTROL_SHAPE.search(text) is not None


_MARKER = re.compile("(\ue000[0-9a-f]{16}\\.\\d+\ue001)")


class MarkedMessages:
    """Messages whose suspicious content is replaced by markers, and what each stands for."""

    __slots__ = ("_count", "_nonce", "marks", "messages", "tools")

    def __init__(
        self,
        messages: list[dict[str, Any]],
        flagged: list[int],
        with_calls: Sequence[int] = (),
        tools: list[dict[str, Any]] | None = None,
        flagged_fields: Sequence[tuple[int, str]] = (),
    ) -> None:
        # A fresh nonce per request: content cannot guess a marker and so cannot forge one.
        self._nonce = secrets.token_hex(8)
        self.marks: dict[str, str] = {}
        self.messages = list(messages)
        self._count = len(messages)  # JSON strings' markers are numbered after the contents'
        self.tools = None if tools is None else self._json(tools)
        for i in with_calls:
            calls = messages[i]["tool_calls"]
            self.messages[i] = {**messages[i], "tool_calls": self._json(calls)}
        for i in flagged:
            content: str = messages[i]["content"]
            core = content.strip()
            # Surrounding whitespace stays outside the marker, so a template that trims
            # content (gemma3) trims it exactly as it would have.
            lead = content[: len(content) - len(content.lstrip())]
            trail = content[len(content.rstrip()) :]
            marker = f"\ue000{self._nonce}.{i}\ue001"
            self.marks[marker] = core
            self.messages[i] = {**self.messages[i], "content": lead + marker + trail}
        for i, key in flagged_fields:
            # Templates write these as they are (Mistral's `"call_id": "' + tool_call_id`,
            # a speaker's `message.name`): the marker stands for the plain text.
            marker = f"\ue000{self._nonce}.{self._count}\ue001"
            self._count += 1
            self.marks[marker] = messages[i][key]
            self.messages[i] = {**self.messages[i], key: marker}

    def _json(self, value: Any) -> Any:
        """A copy of a JSON value whose strings (keys too) that look like control tokens are
        markers, each standing for the string as `tojson` writes it between the quotes."""
        kind = type(value)
        if kind is str:
            return self._json_string(value)
        if kind is dict:
            return {self._json_string(k): self._json(v) for k, v in value.items()}
        if kind is list:
            return [self._json(v) for v in value]
        return value

    def _json_string(self, text: str) -> str:
        # Every shape starts with < or [: most strings have neither (a memchr each).
        if ("<" not in text and "[" not in text) or CONTROL_SHAPE.search(text) is None:
            return text
        marker = f"\ue000{self._nonce}.{self._count}\ue001"
        self._count += 1
        # What json.dumps(ensure_ascii=False), and so the templates' tojson, writes.
        self.marks[marker] = encode_basestring(text)[1:-1]
        return marker

    def texts(self) -> list[str]:
        """The distinct contents to tokenize as plain text."""
        return list(dict.fromkeys(self.marks.values()))

    def assemble(
        self, prompt: str, plain_tokens: dict[str, list[int]], llama_adds_bos: bool
    ) -> str:
        """The prompt with each marker replaced by its content: a MixedPrompt (template
        text as strings, the content as token ids) when any marker is there, else the
        prompt as it is."""
        text: list[str] = []
        pieces: list[str | int] = []
        pending = ""  # template text (and imitation markers) up to the next real marker
        for k, part in enumerate(_MARKER.split(prompt)):
            core = self.marks.get(part) if k % 2 else None
            if core is None:
                if self._nonce in part:
                    # The template cut a marker apart (e.g. truncated content): what it
                    # stood for cannot be placed, and must not reach the model as is.
                    raise ChatTemplateRejected(
                        "the chat template transforms message content in a way that keeps "
                        "it from being sent as plain text",
                        param="messages",
                    )
                pending += part
                continue
            if pending:
                text.append(pending)
                pieces.append(pending)
                pending = ""
            text.append(core)
            pieces.extend(plain_tokens[core])
        if pending:
            text.append(pending)
            pieces.append(pending)
        if not any(type(p) is int for p in pieces):
            return "".join(text)  # only empty contents: llama.cpp reads all-strings as n prompts
        if llama_adds_bos and type(pieces[0]) is int:
            # llama.cpp adds BOS only when a mixed prompt starts with a string.
            pieces.insert(0, "")
        return MixedPrompt("".join(text), pieces)


def _json_may_hold_control(value: Any) -> bool:
    dump = fastjson.dumps(value)
    # The `[` branch has a literal first byte the regex engine scans for quickly; the `<`
    # branch only runs for a dump that has a `<` at all (a memchr), rare in schemas.
    if b"<" in dump:
        return _SHAPE_START.search(dump) is not None
    return _BRACKET_START.search(dump) is not None


def mark_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> MarkedMessages | None:
    """Markers for every message content (and `name`, `tool_call_id`), and every string of
    the tools and of earlier tool calls, that may hold a control token; None (the fast
    path) when none does."""
    search = CONTROL_SHAPE.search
    flagged = [
        i
        for i, message in enumerate(messages)
        if type(content := message.get("content")) is str
        # Every shape starts with < or [: most prose has neither, and `in` is a memchr.
        and ("<" in content or "[" in content)
        and search(content) is not None
    ]
    # Tools and calls: one dump in C and one search per request that has them.
    with_calls = [
        i
        for i, message in enumerate(messages)
        if message.get("tool_calls") and _json_may_hold_control(message["tool_calls"])
    ]
    # A message's other strings reach the template too: a client's `name` (chat), a tool
    # result's call id (`tool_call_id`, from Anthropic's tool_use_id and the Responses
    # call_id); a template that writes one would otherwise take a forged turn from it.
    flagged_fields = [
        (i, key)
        for i, message in enumerate(messages)
        if len(message) > 2  # role and content only, nearly every message: nothing more
        for key in _OTHER_STRINGS
        if type(value := message.get(key)) is str
        and ("<" in value or "[" in value)
        and search(value) is not None
    ]
    marked_tools = tools is not None and _json_may_hold_control(tools)
    if not (flagged or with_calls or marked_tools or flagged_fields):
        return None
    return MarkedMessages(
        messages, flagged, with_calls, tools if marked_tools else None, flagged_fields
    )


_OTHER_STRINGS = ("name", "tool_call_id")
