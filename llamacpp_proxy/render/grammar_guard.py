"""Output constraints that llama.cpp's grammar builder cannot survive, refused before they
reach it (pure: no I/O).

A GBNF repetition `x{m,n}` whose minimum is above its maximum makes llama-server (b11434)
loop in its grammar parser, on the HTTP thread that took the request, allocating about
300 MB a second until the machine runs out of memory: the client leaving does not stop it
(measured: 4.4 GB in 14 s, the process at 100% of a core, its slot's request never
answered). One request through any key could take a GPU server down. Such a repetition
comes from three places a client controls:

- a raw `grammar` (llama.cpp's extension): `root ::= "a"{5,2}`;
- a JSON schema's string bounds, `"minLength": 5, "maxLength": 2` (llama.cpp writes them as
  that repetition), at any depth;
- a JSON schema's `pattern` with such a quantifier, `^a{5,2}$`.

Each is unsatisfiable anyway (no output matches it), so refusing it with a 400 takes nothing
from a client. Arrays' and objects' bounds (`minItems` > `maxItems`, ...), huge bounds and
other odd schemas were tried against the same llama-server and are answered (a 400 or a
generation), so they pass through as before.
"""

from __future__ import annotations

import re
from typing import Any, TypeGuard

_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*,\s*(\d+)\s*\}")
"""`{m,n}` with both bounds: the only form whose bounds can be inverted."""

_NOT_SCHEMAS = frozenset({"const", "enum", "default", "examples"})
"""Keys whose values are data, not schemas: not walked (an example object may have any
fields, `minLength` among them)."""


def grammar_problem(grammar: str) -> str | None:
    """Why llama.cpp must not get this GBNF grammar, or None. Quantifiers inside string
    literals, character classes and comments are text, not repetitions."""
    i, n = 0, len(grammar)
    while i < n:
        c = grammar[i]
        if c == "#":
            end = grammar.find("\n", i)
            i = n if end < 0 else end + 1
        elif c == '"' or c == "[":
            i = _skip_quoted(grammar, i + 1, '"' if c == '"' else "]")
        elif c == "{":
            found = _QUANTIFIER.match(grammar, i)
            if found is not None and int(found[1]) > int(found[2]):
                return _inverted("the grammar's repetition", found[0])
            i += 1
        else:
            i += 1
    return None


def schema_problem(schema: Any) -> str | None:
    """Why llama.cpp must not get this JSON schema, or None."""
    stack: list[tuple[Any, str]] = [(schema, "#")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, list):
            stack.extend((item, f"{where}/{i}") for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        low, high = node.get("minLength"), node.get("maxLength")
        if _count(low) and _count(high) and low > high:
            return (
                f"{where}: 'minLength' ({low}) is greater than 'maxLength' ({high}): no "
                "string satisfies it, and llama.cpp's grammar builder does not finish on "
                "it (it takes memory until none is left)"
            )
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            problem = _pattern_problem(pattern)
            if problem is not None:
                return f"{where}: {problem}"
        for key, value in node.items():
            if key not in _NOT_SCHEMAS and isinstance(value, dict | list):
                stack.append((value, f"{where}/{_pointer_token(str(key))}"))
    return None


def _pattern_problem(pattern: str) -> str | None:
    """A regular expression's inverted quantifier (as llama.cpp reads patterns: `\\x` is one
    escaped character, `[...]` a class whose braces are text)."""
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
        elif c == "[":
            i = _skip_quoted(pattern, i + 1, "]")
        elif c == "{":
            found = _QUANTIFIER.match(pattern, i)
            if found is not None and int(found[1]) > int(found[2]):
                return _inverted("the pattern's quantifier", found[0])
            i += 1
        else:
            i += 1
    return None


def _skip_quoted(text: str, i: int, close: str) -> int:
    """The index after the `close` that ends a literal or class starting at `i`."""
    n = len(text)
    while i < n and text[i] != close:
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _inverted(what: str, quantifier: str) -> str:
    return (
        f"{what} {quantifier} has its minimum above its maximum: nothing matches it, and "
        "llama.cpp's grammar builder does not finish on it (it takes memory until none is "
        "left)"
    )


def _pointer_token(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")
