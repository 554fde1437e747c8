"""The model id clients see: a name they can type, never a filesystem path of the host."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .config import Settings

_SHARD = re.compile(r"-\d{5}-of-\d{5}$")  # llama.cpp's split GGUF files: model-00001-of-00003


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or "\\" in text or text.lower().endswith(".gguf")


def _stem(path: str) -> str:
    name = re.split(r"[/\\]", path.rstrip("/\\"))[-1]
    if name.lower().endswith(".gguf"):
        name = name[:-5]
    return _SHARD.sub("", name) or "llama.cpp"


def model_display_name(props: Mapping[str, Any], settings: Settings) -> str:
    """--model-name, else llama.cpp's alias (--alias, or the -hf repository), else the GGUF
    file's stem. llama.cpp's alias defaults to the -m path, which is never shown."""
    if settings.model_name:
        return settings.model_name
    path = props.get("model_path")
    alias = props.get("model_alias")
    if isinstance(alias, str) and alias.strip() and alias != path and not _looks_like_path(alias):
        return alias
    for candidate in (path, alias):
        if isinstance(candidate, str) and candidate.strip():
            return _stem(candidate)
    return "llama.cpp"


def model_object(name: str, created: int) -> dict[str, Any]:
    """An OpenAI model object."""
    return {"id": name, "object": "model", "created": created, "owned_by": "llamacpp"}
