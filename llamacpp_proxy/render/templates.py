"""Chat templates: a Hugging Face-compatible sandboxed Jinja2 environment, messages -> prompt.

Templates come from the operator (a file, a built-in name, or the model's own template from
llama.cpp's /props). Message content is user data: it is passed to the template as values,
never parsed as template code, and the sandbox keeps the template itself away from Python
internals.
"""

from __future__ import annotations

import json
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.sandbox
from jinja2.exceptions import SecurityError

from ..errors import ChatTemplateRejected

BUILTIN_DIR = "chat_templates"


class TemplateLoadError(ValueError):
    """A template cannot be used: the message names it and says why."""


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # As transformers does: no ASCII escaping, so non-English text reaches the model as is.
    return json.dumps(
        value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )


def make_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment Hugging Face's apply_chat_template renders in."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols"],
        autoescape=False,
        keep_trailing_newline=False,
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template; compile once, render per request."""

    def __init__(self, source: str, origin: str) -> None:
        self.origin = origin
        self.source = source
        try:
            self._template = make_environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateLoadError(
                f"chat template {origin} does not parse: line {exc.lineno}: {exc.message}"
            ) from exc
        self.uses_tools = "tools" in source

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        bos_token: str = "",
        eos_token: str = "",
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        llama_adds_bos: bool = True,
    ) -> str:
        """The prompt for these messages; ChatTemplateRejected if the template refuses them.

        When llama.cpp adds BOS itself as it tokenizes the prompt (`llama_adds_bos`), a BOS
        the template writes at the start is removed here rather than sent twice. When it
        does not (SmolLM2's /props names `<|im_start|>` as its BOS, but the model adds
        none), the template's first token is part of the prompt and is kept.
        """
        try:
            prompt = self._template.render(
                messages=messages,
                tools=tools,
                bos_token=bos_token,
                eos_token=eos_token,
                add_generation_prompt=add_generation_prompt,
            )
        except SecurityError as exc:
            raise ChatTemplateRejected(
                f"the chat template attempted an unsafe operation: {exc}", param="messages"
            ) from exc
        except jinja2.TemplateError as exc:
            raise ChatTemplateRejected(
                str(exc) or "the chat template rejected the messages", param="messages"
            ) from exc
        except (
            TypeError,
            ValueError,
            KeyError,
            IndexError,
            AttributeError,
            ArithmeticError,
        ) as exc:
            raise ChatTemplateRejected(
                f"the chat template could not render these messages: {exc}", param="messages"
            ) from exc
        if llama_adds_bos and bos_token and prompt.startswith(bos_token):
            prompt = prompt[len(bos_token) :]
        return prompt


def builtin_template_names() -> list[str]:
    """Names accepted by --chat-template-jinja besides a path."""
    folder = resources.files(__package__).joinpath(BUILTIN_DIR)
    return sorted(
        entry.name.removesuffix(".jinja")
        for entry in folder.iterdir()
        if entry.name.endswith(".jinja")
    )


def load_chat_template(spec: str) -> ChatTemplate:
    """A built-in template by name (`gemma3`) or a template file by path."""
    if "/" not in spec and not spec.endswith(".jinja") and spec in builtin_template_names():
        source = (
            resources.files(__package__)
            .joinpath(BUILTIN_DIR, f"{spec}.jinja")
            .read_text(encoding="utf-8")
        )
        return ChatTemplate(source, f"'{spec}' (built in)")
    path = Path(spec)
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        names = ", ".join(builtin_template_names())
        raise TemplateLoadError(
            f"chat template file {path} does not exist (built-in names: {names})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateLoadError(f"chat template file {path} cannot be read: {exc}") from exc
    return ChatTemplate(source, str(path))
