"""Bounds on the rendered chat prompt, and the template render kept off the event loop when
the request is large (docs/resilience.md, "The client connection", has the measurements).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from ..errors import InvalidRequest

T = TypeVar("T")

# A body up to this size renders on the loop: measured, the built-in templates render such a
# chat in a few milliseconds, and a hop to a thread would cost more than it saves. Above it a
# template's cost grows with the body (tools serialized with tojson(indent=...) run in pure
# Python at about 4 MiB/s), so the render runs in a thread: Jinja is Python code, which hands
# the GIL back every switch interval, so the loop keeps its turns meanwhile.
RENDER_ON_LOOP_MAX_BODY = 64 * 1024

# The rendered prompt may be larger than the body (a template's markup per message, tool
# schemas re-indented), but not by much for a real chat: twice the body cap leaves room for
# that and still refuses a template that multiplies what the client sent.
PROMPT_TO_BODY_RATIO = 2


def body_size(content_length: str | None) -> int | None:
    """The request body's size from its Content-Length (checked before the body was read);
    None for a chunked body."""
    return int(content_length) if content_length is not None and content_length.isdigit() else None


async def render_off_loop_if_large(
    size: int | None, render: Callable[..., T], *args: object, **kwargs: object
) -> T:
    """`render(*args, **kwargs)`: on the loop for a small body, in a thread for a large one
    (or one of unknown size)."""
    if size is not None and size <= RENDER_ON_LOOP_MAX_BODY:
        return render(*args, **kwargs)
    return await asyncio.to_thread(render, *args, **kwargs)


def check_prompt_size(prompt: str, max_body_size: int) -> None:
    """A 400 if the rendered prompt is over PROMPT_TO_BODY_RATIO x --max-body-size bytes."""
    limit = PROMPT_TO_BODY_RATIO * max_body_size
    if len(prompt) * 4 <= limit:
        return  # the common case, O(1): even 4-byte characters throughout fit
    # str.isascii() is O(1) in CPython; only a large non-ASCII prompt pays for the encode.
    size = len(prompt) if prompt.isascii() else len(prompt.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise InvalidRequest(
            f"The chat template rendered these messages into a prompt of {size} bytes; the "
            f"limit is {limit} (twice the largest request body, {max_body_size} bytes). "
            "Send a shorter conversation or fewer or smaller tools.",
            param="messages",
            code="prompt_too_large",
        )
