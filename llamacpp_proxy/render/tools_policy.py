"""What to do with tools a model's chat template cannot express (pure: no I/O).

Per model (the upstreams file's `tools_policy`, else `--tools-policy`):
- "refuse" (the default): a 400 `tools_not_supported`, as the gateway always answered;
- "drop": the tools are not offered, the answer says so in `X-Tools-Dropped`, and earlier
  tool calls and results in the conversation are written as plain text, so a template
  without tool support can still render them (Claude Code sends its tools and their
  history on every request, even to say hello);
- "describe": the tools are written into the system prompt and the model's calls parsed
  back from its text (render/tools_describe.py), as LiteLLM's `add_function_to_prompt`.

"refuse" stays the default: the other two change what the model is asked (drop: without the
tools; describe: a prompt longer by every schema, which a small context may not hold), so
the operator chooses them per model, knowing the model.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_POLICY = "refuse"
DROPPED_HEADER = "X-Tools-Dropped"


def plain_tool_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with tool calls and tool results as ordinary text turns (a copy;
    messages without tools are passed through as they are)."""
    if not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return messages
    out: list[dict[str, Any]] = []
    last_has_result = False  # out[-1] is a user message holding a tool result
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            lines = [message.get("content") or ""]
            for call in calls:
                fn = call["function"]
                arguments = json.dumps(fn["arguments"], ensure_ascii=False)
                lines.append(f"[called tool {fn['name']} with {arguments}]")
            text = "\n".join(line for line in lines if line)
            out.append({"role": "assistant", "content": text})
            last_has_result = False
            continue
        is_result = message["role"] == "tool"
        if is_result:
            message = {"role": "user", "content": f"[tool result]\n{message.get('content') or ''}"}
        last_has_result = append_turn(out, message, is_result, last_has_result)
    return out


def append_turn(
    out: list[dict[str, Any]], message: dict[str, Any], is_result: bool, last_has_result: bool
) -> bool:
    """Append a message to a conversation written without tools (plain_tool_history's, or
    the "describe" policy's), merging a user message into the user message before it when
    either holds a tool result; whether out[-1] now holds one. Results of parallel calls,
    and the user's text sent with them, are one user turn: Gemma's and Mistral's templates
    refuse two user turns in a row."""
    previous = out[-1] if out else None
    if (
        message["role"] == "user"
        and previous is not None
        and previous["role"] == "user"
        and (is_result or last_has_result)
        and isinstance(previous.get("content"), str)
        and isinstance(message.get("content"), str)
    ):
        out[-1] = {"role": "user", "content": f"{previous['content']}\n{message['content']}"}
        return True
    out.append(message)
    return is_result
