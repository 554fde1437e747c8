"""The one-event-per-read fast paths of the chunked body and SSE decoders (a GPU's pace)
give exactly what the general parsers give, and refuse exactly what they refuse."""

from __future__ import annotations

from typing import Any

import pytest

from llamacpp_proxy.upstream.http import BodyDecoder, ProtocolError, ResponseHead
from llamacpp_proxy.upstream.sse import SSEDecoder

EVENT = b'data: {"content":" fox","stop":false}\n\n'


def chunked() -> BodyDecoder:
    return BodyDecoder(ResponseHead(200, {"transfer-encoding": "chunked"}, True), "POST")


def byte_by_byte(decoder: BodyDecoder, data: bytes) -> bytes:
    return b"".join(decoder.feed(data[i : i + 1]) for i in range(len(data)))


@pytest.mark.parametrize(
    "chunk",
    [
        b"%x\r\n%s\r\n" % (len(EVENT), EVENT),
        b"%X;ext=1\r\n%s\r\n" % (len(EVENT), EVENT),  # an extension, upper-case hex
        b"4\r\nab\r\n\r\n",  # the data itself ends in CRLF
        b"0002\r\nab\r\n",  # leading zeros
    ],
)
def test_a_whole_chunk_per_read_gives_what_the_general_parser_gives(chunk: bytes) -> None:
    fast = chunked()
    reads = [fast.feed(chunk) for _ in range(3)]
    assert reads == [byte_by_byte(chunked(), chunk)] * 3
    assert fast.feed(b"0\r\n\r\n") == b"" and fast.done and not fast.extra


@pytest.mark.parametrize(
    "chunk",
    [
        b"3\r\nabcd\r\n",  # more data than the size says
        b"+3\r\nabc\r\n",  # not a hex size
        b"3\r\nabc\n\r",  # the data not followed by CRLF
    ],
)
def test_a_chunk_the_general_parser_refuses_is_refused(chunk: bytes) -> None:
    with pytest.raises(ProtocolError):
        chunked().feed(chunk)
    with pytest.raises(ProtocolError):
        byte_by_byte(chunked(), chunk)


@pytest.mark.parametrize("read", [b"5\r\nabc\r\n", b"3 \r\nabc\r\n\n"])
def test_a_read_that_ends_inside_a_chunk_waits_for_the_rest(read: bytes) -> None:
    decoder = chunked()
    assert decoder.feed(read) == byte_by_byte(chunked(), read)
    assert not decoder.done


def sse_byte_by_byte(data: bytes) -> list[tuple[str, bytes]]:
    decoder = SSEDecoder()
    events = []
    for i in range(len(data)):
        events += decoder.feed(data[i : i + 1])
    return events + decoder.close()


@pytest.mark.parametrize(
    "read",
    [
        EVENT,
        b"data: a\ndata: b\n\n",  # two data lines: one event "a\nb"
        b"data: a\r\n\r\n",  # CRLF lines
        b"data: a\rdata: b\n\n",  # a lone CR ends a line too
        b"data:a\n\n",  # no space after the colon
        b"error: {}\n\n",
        b"data: \n\n",  # empty data
    ],
)
def test_one_event_per_read_gives_what_the_line_parser_gives(read: bytes) -> None:
    decoder = SSEDecoder()
    fast = [decoder.feed(read) for _ in range(3)]
    expected = sse_byte_by_byte(read)
    assert fast == [expected] * 3


def test_an_event_after_half_an_event_is_joined() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(EVENT[:10]) == []
    assert decoder.feed(EVENT[10:] + EVENT) == [("data", EVENT[6:-2])] * 2


def test_the_event_check_fast_test_agrees_with_the_field_by_field_checks() -> None:
    # event_problem recognises the common partial event in one expression and leaves
    # everything else to the field-by-field checks: both must give the same answer.
    from llamacpp_proxy.upstream.llamacpp import _event_problem, event_problem

    base = {"index": 0, "content": " fox", "tokens": [1], "stop": False, "id_slot": 0}
    values: dict[str, list[Any]] = {
        "content": [" fox", "", None, 3, b"x", [" fox"]],
        "stop": [False, True, None, 0, 1, "false"],
        "tokens_predicted": [None, 0, 7, -1, 1.0, True, "3"],
        "tokens_evaluated": [None, 0, 31, -2, 2.5, False],
        "stop_type": [None, "eos", "limit", 1, ""],
        "completion_probabilities": [
            None,
            [],
            [{"token": " fox", "logprob": -0.1, "bytes": [32], "top_logprobs": []}],
            "x",
            [{"token": 1}],
        ],
    }
    corpus = [dict(base)]
    for name, options in values.items():
        for value in options:
            event = dict(base)
            if value is None:
                event.pop(name, None)
            else:
                event[name] = value
            corpus.append(event)
            corpus.append({**event, "stop": True, "stop_type": "eos", "tokens_predicted": 5})
    for event in corpus:
        assert event_problem(event) == _event_problem(event), event
