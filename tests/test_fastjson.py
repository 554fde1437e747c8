"""The hot-path JSON helpers behave like the standard library where it matters."""

from __future__ import annotations

import json

from llamacpp_proxy import fastjson


def test_dumps_is_compact_utf8_without_ascii_escapes() -> None:
    assert fastjson.dumps({"a": "日本", "b": [1, 2.5, None, True]}) == (
        '{"a":"日本","b":[1,2.5,null,true]}'.encode()
    )


def test_dumps_falls_back_for_integers_beyond_64_bits() -> None:
    value = {"maximum": 10**30}
    assert json.loads(fastjson.dumps(value)) == value


def test_loads_takes_bytes_and_text() -> None:
    assert fastjson.loads(b'{"content": "\\u00e9"}') == {"content": "é"}
    assert fastjson.loads('{"stop": true}') == {"stop": True}
