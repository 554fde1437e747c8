"""ChunkEncoder's content chunks: the per-index prefix it keeps must change no byte."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llamacpp_proxy.fastjson import dumps
from llamacpp_proxy.frontdoor.openai_response import ChunkEncoder

TEXTS = [
    "",
    "token",
    " spaced",
    'quote " and \\ backslash',
    "line\nbreak\ttab",
    "é日本語🙂",
    "\x00",
]
LOGPROBS: list[dict[str, Any] | None] = [
    None,
    {"content": [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}]},
    {"tokens": ["a"], "token_logprobs": [-0.5], "top_logprobs": [{"a": -0.5}], "text_offset": [3]},
]


def reference(
    chat: bool, response_id: str, created: int, model: str, index: int, text: str, lp: Any
) -> bytes:
    """The chunk as the encoder built it before it kept a prefix per index."""
    obj = b"chat.completion.chunk" if chat else b"text_completion"
    head = (
        b'data: {"id":'
        + dumps(response_id)
        + b',"object":"'
        + obj
        + b'","created":'
        + str(created).encode()
        + b',"model":'
        + dumps(model)
        + b',"choices":['
    )
    return b"".join(
        (
            head,
            b'{"index":',
            str(index).encode(),
            b',"delta":{"content":' if chat else b',"text":',
            dumps(text),
            b'},"logprobs":' if chat else b',"logprobs":',
            b"null" if lp is None else dumps(lp),
            b',"finish_reason":null}]}\n\n',
        )
    )


@pytest.mark.parametrize("chat", [True, False])
def test_content_chunks_are_byte_identical_to_the_reference(chat: bool) -> None:
    encoder = ChunkEncoder(chat, "chatcmpl-x1", 1_700_000_000, 'model "q"')
    for _ in range(2):  # the second pass uses the kept prefixes
        for index in (0, 1, 0, 12, 3):
            for text in TEXTS:
                for lp in LOGPROBS:
                    got = encoder.content(index, text, lp)
                    want = reference(
                        chat, "chatcmpl-x1", 1_700_000_000, 'model "q"', index, text, lp
                    )
                    assert got == want
                    choice = json.loads(got[len(b"data: ") :])["choices"][0]
                    assert choice["index"] == index
