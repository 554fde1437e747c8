"""The internal request every front door builds and the upstream reads (no I/O).

It sits below the front doors so that the upstream stage never imports a front door.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CompletionRequest:
    """A validated /v1/completions or /v1/chat/completions request, in OpenAI's terms."""

    chat: bool
    model: str | None
    prompts: list[str] = field(default_factory=list)
    """Text completions: one or more prompts (one choice each, times n)."""
    messages: list[dict[str, Any]] = field(default_factory=list)
    """Chat: messages normalised for the template (content always a string or None)."""
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    """False: at most one tool call per answer (OpenAI's `parallel_tool_calls: false`,
    Anthropic's `disable_parallel_tool_use`); calls past the first are dropped."""
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    """None: no logprobs; k: logprobs with k alternatives per token (0 = chosen token only)."""
    echo: bool = False
    user: str | None = None
    json_schema: dict[str, Any] | None = None
    """From response_format: the schema the output must follow ({} = any JSON object)."""
    extensions: dict[str, Any] = field(default_factory=dict)
    """llama.cpp sampling fields passed through as sent (grammar, top_k, min_p, ...)."""
