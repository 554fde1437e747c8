"""OpenAI's embeddings API, its edges only (pure: no I/O): a POST /v1/embeddings body
validated into an `EmbeddingsRequest`, and llama.cpp's vectors encoded as OpenAI's answer.

What each field does, and what llama.cpp is asked, is in docs/compatibility.md.
"""

from __future__ import annotations

import base64
import math
import sys
from array import array
from dataclasses import dataclass
from typing import Any

from .. import fastjson
from ..errors import InvalidRequest
from .fields import huge_int

MAX_INPUTS = 2048
"""Inputs per request (OpenAI's limit): each is a vector to compute and to answer."""
MAX_INPUT_TOKENS = 8192
"""Token ids per token-array input (OpenAI's per-input limit)."""
MAX_INPUT_CHARS = 32 * MAX_INPUT_TOKENS
"""Characters per text input: more than 8192 tokens of any tokenizer's longest tokens."""
MAX_TOKEN_ID = 2**31 - 1  # llama.cpp reads token ids as 32-bit
ENCODING_FORMATS = ("float", "base64")
_LITTLE_ENDIAN = sys.byteorder == "little"


@dataclass
class EmbeddingsRequest:
    """A validated POST /v1/embeddings request."""

    model: str | None
    inputs: list[str] | list[list[int]]
    """One entry per vector: all texts, or all token-id arrays (never mixed)."""
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None


def _bad(param: str, message: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def _too_long(where: str, size: int, unit: str, limit: int) -> InvalidRequest:
    """The 400 for one input over its size limit (token ids or characters)."""
    return _bad(
        "input", f"{where} has {size} {unit}; the limit is {limit} per input.", "input_too_long"
    )


def _is_token(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_TOKEN_ID


def _token_array(value: list[Any], where: str) -> list[int]:
    if not value:
        raise _bad("input", f"{where} is an empty array of tokens; send at least one token id.")
    if len(value) > MAX_INPUT_TOKENS:
        raise _too_long(where, len(value), "tokens", MAX_INPUT_TOKENS)
    for token in value:
        if not _is_token(token):
            raise _not_token(token, where)
    return value


def _not_token(value: Any, where: str) -> InvalidRequest:
    # JSON Schema takes 2.0 for an integer; the words say why it is refused all the same.
    float_ = type(value) is float and huge_int(value) is None
    kind = "; a token id must be an integer, not float" if float_ else ""
    return _bad("input", f"{where} must hold token ids: integers from 0 to {MAX_TOKEN_ID}{kind}.")


def _text(value: str, where: str) -> str:
    if not value:
        raise _bad("input", f"{where} is an empty string; there is nothing to embed.")
    if len(value) > MAX_INPUT_CHARS:
        raise _too_long(where, len(value), "characters", MAX_INPUT_CHARS)
    return value


def _inputs(value: Any) -> list[str] | list[list[int]]:
    """OpenAI's four forms of `input`: a string, an array of strings, an array of token
    ids (one input), an array of token-id arrays."""
    if value is None:
        raise _bad("input", "'input' is required.", "missing_required")
    if isinstance(value, str):
        return [_text(value, "'input'")]
    if not isinstance(value, list):
        raise _bad(
            "input",
            "'input' must be a string, an array of strings, an array of token ids or an "
            f"array of token-id arrays, not {type(value).__name__}.",
        )
    if not value:
        raise _bad("input", "'input' is an empty array; send at least one input.")
    first = value[0]
    if type(first) is int or type(first) is float:
        return [_token_array(value, "'input'")]
    if len(value) > MAX_INPUTS:
        raise _bad(
            "input",
            f"'input' has {len(value)} inputs; the limit is {MAX_INPUTS} per request.",
            "array_above_max_length",
        )
    if isinstance(first, str):
        texts: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _bad("input", "'input' must not mix strings with other values.")
            texts.append(_text(item, f"'input[{i}]'"))
        return texts
    if isinstance(first, list):
        arrays: list[list[int]] = []
        for i, item in enumerate(value):
            if not isinstance(item, list):
                raise _bad("input", "'input' must not mix token-id arrays with other values.")
            arrays.append(_token_array(item, f"'input[{i}]'"))
        return arrays
    raise _bad(
        "input",
        "'input' must be a string, an array of strings, an array of token ids or an array "
        f"of token-id arrays; it holds a {type(first).__name__}.",
    )


def parse_embeddings_request(body: dict[str, Any]) -> EmbeddingsRequest:
    """Validate a POST /v1/embeddings body; a 400 names the field. Unknown fields are
    ignored (clients send vendor extras), as on the other endpoints."""
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or len(model) > 256):
        raise _bad("model", "'model' must be a string of at most 256 characters.")
    request = EmbeddingsRequest(model=model, inputs=_inputs(body.get("input")))
    encoding = body.get("encoding_format")
    if encoding is not None:
        if encoding not in ENCODING_FORMATS:
            raise _bad("encoding_format", "'encoding_format' must be 'float' or 'base64'.")
        request.encoding_format = encoding
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if type(dimensions) is float and huge_int(dimensions) is None:
            raise _bad("dimensions", "'dimensions' must be an integer, not float.")
        if type(dimensions) is not int or not 1 <= dimensions <= MAX_TOKEN_ID:
            raise _bad(
                "dimensions", f"'dimensions' must be a positive integer up to {MAX_TOKEN_ID}."
            )
        request.dimensions = dimensions
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", f"'user' must be a string, not {type(user).__name__}.")
    request.user = user
    return request


def estimate_tokens(inputs: list[str] | list[list[int]]) -> int:
    """Tokens the inputs are taken to hold before llama.cpp counts them (the admission's
    estimate): a token array its length, a text one per 4 UTF-8 bytes (rounded up)."""
    total = 0
    for item in inputs:
        if isinstance(item, str):
            total += math.ceil(len(item.encode()) / 4)
        else:
            total += len(item)
    return total


def dimensions_refused(asked: int, size: int) -> InvalidRequest:
    """The 400 for a `dimensions` the model's vectors do not have."""
    return _bad(
        "dimensions",
        f"This model's embeddings have {size} dimensions; llama.cpp cannot shorten them, so "
        f"'dimensions' must be {size} or left out (it was {asked}).",
        "unsupported_dimensions",
    )


def _base64(vector: array[float]) -> str:
    if not _LITTLE_ENDIAN:  # OpenAI's base64 is little-endian float32
        vector = array("f", vector)
        vector.byteswap()
    return base64.b64encode(vector.tobytes()).decode("ascii")


def embeddings_response(
    model: str, vectors: list[array[float]], encoding_format: str, prompt_tokens: int
) -> bytes:
    """OpenAI's answer: `object: "list"`, one `embedding` object per input in input order,
    the model, and llama.cpp's token count as usage."""
    if encoding_format == "base64":
        encoded: list[Any] = [_base64(v) for v in vectors]
    else:
        # float32 widened to double: the same decimal numbers llama.cpp itself prints.
        encoded = [v.tolist() for v in vectors]
    return fastjson.dumps(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)
            ],
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )
