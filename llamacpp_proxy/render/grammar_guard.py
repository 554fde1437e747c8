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

A raw grammar's groups nested thousands deep (`root ::= ((((...))))`, 20000 levels) make
its parser recurse until the stack overflows: llama-server dies at once, every request on
it with it. So do 100000 rules each naming the next (`r0 ::= r1`, ...): llama.cpp follows rule
references by recursion too. A grammar is refused past MAX_GRAMMAR_NESTING levels of groups
or MAX_GRAMMAR_RULES rules, far beyond what a grammar needs.

A raw grammar that can be read in many ways at once (`("a"?){0,300}`, `("a" | "aa"){0,2000}`)
keeps a core busy as a schema's ambiguous pattern does, and is refused under the same bound.

Each inverted repetition is unsatisfiable anyway (no output matches it), so refusing it
with a 400 takes nothing from a client. Arrays' and objects' bounds (`minItems` >
`maxItems`, ...), huge bounds and other odd schemas were tried against the same
llama-server and are answered (a 400 or a generation), so they pass through as before.
"""

from __future__ import annotations

import re
from typing import Any, TypeGuard

from .gbnf import MAX_EXPANDED_ELEMENTS, GrammarTooLarge, analyse
from .schema_limits import MAX_PATTERN_AMBIGUITY, NAMED_SCHEMAS, schema_limits_problem

_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*,\s*(\d+)\s*\}")
"""`{m,n}` with both bounds: the only form whose bounds can be inverted."""

MAX_GRAMMAR_NESTING = 256
"""Parenthesised groups a raw grammar may nest. llama-server b11434 survived 10000 levels
and crashed on 20000 (its main thread's 8 MB stack); a thread with a smaller stack, or
another build, overflows sooner, so the bound keeps a wide margin."""

MAX_GRAMMAR_CHARS = 65536
"""A raw grammar's length. Its analysis (render/gbnf.py) costs about 1-1.5 ms a KiB (an
800 KB grammar held every client for 0.87 s when it ran on the event loop; a large one now
runs in a worker thread, frontdoor/constraint_check.py); llama.cpp's own grammars (JSON, C,
chess) are 1-2 KiB, and a large structure is better sent as a JSON schema."""

MAX_GRAMMAR_RULES = 4096
"""Rules a raw grammar may define: a chain of 20000 rule references was answered, 100000
crashed llama-server (each group is a rule too, so the two bounds hold the depth together)."""

MAX_GRAMMAR_AMBIGUITY = MAX_PATTERN_AMBIGUITY
"""Parses llama.cpp may keep at once, counted as for a schema's pattern: the same grammar
written by hand costs it the same (`("a"?){0,300}`: no token in 15 s, the core busy after
the client left; `("a" | "aa"){0,2000}` 9 s of a core for 100 tokens, 2 s unambiguous)."""

_NOT_SCHEMAS = frozenset({"const", "enum", "default", "examples"})
"""Keys whose values are data, not schemas: not walked (an example object may have any
fields, `minLength` among them)."""


def grammar_problem(grammar: str) -> str | None:
    """Why llama.cpp must not get this GBNF grammar, or None. Quantifiers and parentheses
    inside string literals, character classes and comments are text."""
    if len(grammar) > MAX_GRAMMAR_CHARS:
        return (
            f"is {len(grammar)} characters long; at most {MAX_GRAMMAR_CHARS} are taken (each "
            "grammar is checked for what would crash llama.cpp before it is sent)"
        )
    i, n, depth, rules = 0, len(grammar), 0, 0
    while i < n:
        c = grammar[i]
        if c == ":" and grammar.startswith("::=", i):
            rules += 1
            if rules > MAX_GRAMMAR_RULES:
                return (
                    f"defines more than {MAX_GRAMMAR_RULES} rules: llama.cpp follows rule "
                    "references by recursion and overflows its stack"
                )
            i += 3
        elif c == "(":
            depth += 1
            if depth > MAX_GRAMMAR_NESTING:
                return (
                    f"nests groups more than {MAX_GRAMMAR_NESTING} levels deep: llama.cpp's "
                    "grammar parser recurses once a level and overflows its stack"
                )
            i += 1
        elif c == ")":
            depth -= 1
            i += 1
        elif c == "#":
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
    # Only once the bounds above hold: the analysis is linear, but on a bounded grammar.
    try:
        rule, ambiguity = analyse(grammar)
    except GrammarTooLarge as large:
        return (
            f"repeats its items into more than {MAX_EXPANDED_ELEMENTS} grammar elements "
            f"(about {large.elements} so far): llama.cpp writes out a copy of an item per "
            "count, and a long literal repeated 2000 times takes it to about a GB"
        )
    if rule is not None:
        return (
            f"rule '{rule}' is left-recursive through elements that can match nothing: "
            "llama.cpp's check misses it and its grammar expansion then takes memory until "
            "none is left"
        )
    if ambiguity > MAX_GRAMMAR_AMBIGUITY:
        return (
            f"can be read in more than {MAX_GRAMMAR_AMBIGUITY} ways at once (about "
            f"{ambiguity}: pieces that can match nothing, or can end where the next begins, "
            "in a row, repetitions multiplying): llama.cpp follows every way on each token"
        )
    return None


def schema_problem(schema: Any) -> str | None:
    """Why llama.cpp must not get this JSON schema, or None: an inverted bound here, or
    more than it can build or follow without crashing or burning a slot
    (schema_limits.py)."""
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
            if key in NAMED_SCHEMAS and isinstance(value, dict):
                # Names, not keywords: a property named "default" is a schema all the same.
                at = f"{where}/{_pointer_token(str(key))}"
                stack.extend((v, f"{at}/{_pointer_token(str(k))}") for k, v in value.items())
            elif key not in _NOT_SCHEMAS and isinstance(value, dict | list):
                stack.append((value, f"{where}/{_pointer_token(str(key))}"))
    # What it would cost llama.cpp to build and follow (schema_limits.py).
    return schema_limits_problem(schema)


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
