"""SSE framing: llama.cpp's events parsed however the bytes are cut."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from llamacpp_proxy.upstream.sse import DONE, SSEDecoder

EVENTS = [
    {"content": "Hel", "stop": False},
    {"content": "lo\n\nworld", "stop": False},
    {"content": "", "stop": True, "stop_type": "eos"},
]
STREAM = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in EVENTS)


def decode_all(pieces: list[bytes]) -> list[tuple[str, bytes]]:
    decoder = SSEDecoder()
    events = []
    for piece in pieces:
        events.extend(decoder.feed(piece))
    events.extend(decoder.close())
    return events


def test_every_split_point_yields_the_same_events() -> None:
    expected = [("data", json.dumps(e).encode()) for e in EVENTS]
    for cut in range(len(STREAM) + 1):
        assert decode_all([STREAM[:cut], STREAM[cut:]]) == expected, cut


def test_byte_by_byte_and_all_at_once() -> None:
    expected = [("data", json.dumps(e).encode()) for e in EVENTS]
    assert decode_all([STREAM[i : i + 1] for i in range(len(STREAM))]) == expected
    assert decode_all([STREAM]) == expected


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_arbitrary_cuts(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    pieces = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    assert [json.loads(p) for _, p in decode_all(pieces)] == EVENTS


def test_crlf_comments_and_multiline_data() -> None:
    raw = b': keep-alive\r\ndata: {"a":\r\ndata: 1}\r\n\r\nevent: x\ndata: 2\n\n'
    assert decode_all([raw]) == [("data", b'{"a":\n1}'), ("data", b"2")]


def test_llamacpp_error_lines_are_reported_as_errors() -> None:
    raw = b'data: {"content":"a"}\n\nerror: {"error":{"message":"boom"}}\n\n'
    assert decode_all([raw]) == [
        ("data", b'{"content":"a"}'),
        ("error", b'{"error":{"message":"boom"}}'),
    ]


def test_unterminated_last_event_is_flushed_on_close() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"stop": true}') == []
    assert decoder.close() == [("data", b'{"stop": true}')]


def test_done_frame() -> None:
    assert DONE == b"data: [DONE]\n\n"
