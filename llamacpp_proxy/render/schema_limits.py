"""Bounds on what a JSON schema may ask of llama.cpp's grammar builder (pure: no I/O).

llama-server (b11434) turns a `json_schema` into a grammar on the HTTP thread, recursively,
then matches every token against it. Measured against it (SmolLM2-135M, `-c 512 -np 1 -t 1`,
docs/compatibility.md), a client could:

- crash it: the builder follows each `$ref` by recursion, so a chain of 7000 `$ref`s, or of
  5000 objects each referring to the next (10000 schema levels), overflowed its stack (5000
  and 3000 passed);
- burn its slot after the client left (a core at 100%, the first token never sampled, so
  the disconnect is never noticed): `"type": ["object", "object"]` nested 20 levels (the
  builder copies and rebuilds the schema once per listed type: 2^20 times, from a 1.5 KB
  body), an enum of 50000 values (5000: 1.1 s before the first token), 2000 optional
  properties in one object (llama.cpp writes out a rule for every suffix of them: 1000 took
  2.8 s for 64 tokens), and a pattern whose optional pieces can be skipped in many ways:
  `^(a{0,2}){0,300}$` or 300 `a?` in a row (more than 20 s for one token; 100 took 3 to 6 s,
  50 took 0.5 s), or whose repeated piece can end where the next copy could begin:
  `^((a{1,10}){0,1000})$` took 49 s of a core for 100 tokens of "aaaa", 2 s without it.

Each bound below keeps a wide margin under what was measured and stays no stricter than
OpenAI's own structured-output limits (5000 properties, 1000 enum values in all), so agents'
tool schemas and OpenAI structured outputs pass. The walk is iterative and visits each
schema llama.cpp would build once: it stops as soon as a bound is passed, so its work is
linear in the schema's size whatever the schema says.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from .gbnf import (
    ANY,
    NOTHING,
    Chars,
    Summary,
    add_span,
    join_alternatives,
    join_sequence,
    repeat_summary,
)

MAX_SCHEMA_DEPTH = 512
"""Schema levels llama.cpp recurses through, `$ref`s followed: about 6000 overflowed the
HTTP thread's 8 MB stack; a thread with a smaller stack overflows sooner. Deeper than the
gateway's JSON depth limit allows a schema without `$ref`s."""

MAX_SCHEMA_NODES = 20000
"""Schemas llama.cpp builds in all (each `$ref` target once, a schema listing k types k
times): room for OpenAI's 5000 properties with a few subschemas each."""

MAX_WALK_STEPS = 100_000
"""Values (objects, arrays, scalars) the check reads in all, each `$ref` target once per
way it is named: a bound on the check's own work. llama.cpp keys its `$ref` targets by
their text, and so does this check, so a list named many ways (`#/$defs/l/0`,
`#/$defs/l/00`, ...) was read once per name: an 89 KiB schema of 400 names for a
40,000-item list took 5.8 s; reading this many takes about 50 ms. A real schema reads each
value once or a few times (5000 properties with a few keywords each: about 10,000; only
objects, arrays and the items of arrays count, not an object's scalar fields)."""

MAX_ENUM_VALUES = 1000
"""`enum` values and `const`s in all (OpenAI's limit on enum values): each is an alternative
llama.cpp tries on every token (1000: 0.3 s before the first token; 5000: 1.1 s)."""

MAX_ALTERNATIVES = 2000
"""`anyOf`/`oneOf` entries in all: like enum values, alternatives llama.cpp may try on
every token (5000 one-key objects: 1.3 s before the first token, then about 1 s a token;
1000 consts: 0.8 s for 8 tokens). `{"type": "null"}` branches are not counted, nor a single branch:
any number of optional fields written `anyOf: [X, {"type": "null"}]` pass."""

MAX_PROPERTIES = 5000
"""Properties in all (OpenAI's limit)."""

MAX_OPTIONAL_PROPERTIES_COST = 256 * 256
"""The sum over objects of the square of their optional properties (llama.cpp's grammar
for them is quadratic): 256 optional properties in one object, or 100 objects of 25."""

MAX_PATTERNS = 256
"""`pattern`s in all, anchored or not: llama.cpp copies every rule built so far before
reading each one, even one it then drops for any string (no `^...$`, `\\d`), so their
cost grows with the square of the schema (5000 anchored took 2.5 s before the first token,
5000 unanchored 2.2 s, the core busy on after the client left; 1000 took 0.12 s)."""

MAX_PATTERN_AMBIGUITY = 32
"""Pieces of a `pattern` that can be skipped, or can end where the next could begin, in a
row, repetitions multiplying (`a?b?` is 2, `(a?){0,10}` is 10, `(a{0,3}){0,100}` and
`(a|aa){0,100}` are 100): llama.cpp keeps one parse per way of reading the text (100
skippable took 3 to 6 s for one token; `(a{1,10}){0,1000}` 49 s for 100 tokens, 2 s
without; `(a|aa){0,32}` took 27 ms a token against 21 unambiguous, `{0,100}` 40 ms)."""

_NOT_SCHEMAS = frozenset({"const", "enum", "default", "examples", "required", "type"})
NAMED_SCHEMAS = frozenset(
    {"properties", "patternProperties", "dependentSchemas", "$defs", "definitions"}
)
"""Keywords whose value maps names to schemas: its keys are names, not keywords (a property
named "type", "enum" or "default" is a schema llama.cpp builds like any other)."""
_BUILT_ONLY_BY_REF = frozenset({"$defs", "definitions"})
_NULL = {"type": "null"}
_COUNTED = frozenset({"enum", "const", "anyOf", "oneOf", "properties", "pattern"})


def schema_limits_problem(schema: Any) -> str | None:
    """Why llama.cpp must not build this JSON schema (it would crash or burn a slot), or
    None. The answer names the keyword and a JSON pointer to it."""
    # Each unit is the root or one `$ref` target: llama.cpp builds each once, keyed by the
    # `$ref` string, and recurses into it where it is first met.
    units: dict[str, Any] = {"#": schema}
    local: dict[str, int] = {}
    edges: dict[str, list[tuple[int, str]]] = {}
    todo = ["#"]
    totals = _Totals()
    while todo:
        unit = todo.pop()
        outgoing: list[tuple[int, str]] = []
        edges[unit] = outgoing
        problem, height = _walk_unit(schema, unit, units[unit], totals, outgoing)
        if problem is not None:
            return problem
        local[unit] = height
        for _, target in outgoing:
            if target not in units:
                resolved = _resolve(schema, target)
                if isinstance(resolved, dict):
                    units[target] = resolved
                    todo.append(target)
    depth = _effective_depth(local, edges)
    if depth > MAX_SCHEMA_DEPTH:
        return (
            f"#: '$ref' makes the schema more than {MAX_SCHEMA_DEPTH} levels deep with its "
            f"references followed (about {depth}): llama.cpp builds the grammar by recursion "
            "and overflows its stack"
        )
    return None


class _Totals:
    __slots__ = (
        "alternatives",
        "enum_values",
        "nodes",
        "optional_cost",
        "patterns",
        "properties",
        "steps",
    )

    def __init__(self) -> None:
        self.steps = 0
        self.nodes = 0
        self.enum_values = 0
        self.alternatives = 0
        self.properties = 0
        self.optional_cost = 0
        self.patterns = 0


def _walk_unit(
    root: Any, unit: str, node: Any, totals: _Totals, refs: list[tuple[int, str]]
) -> tuple[str | None, int]:
    """Count what llama.cpp builds for one unit; its `$ref`s go to `refs` with their depth.
    A problem, or None and the unit's height."""
    # A pointer is kept as (parent, token) and spelled out only for a problem: most
    # schemas have none, and formatting one per node was most of the walk's time.
    stack: list[tuple[Any, _Where, int, int]] = [(node, unit, 1, 1)]
    height = 0
    while stack:
        node, where, depth, times = stack.pop()
        totals.steps += 1
        if totals.steps > MAX_WALK_STEPS:
            return (
                f"{_spell(where)}: the schema holds more than {MAX_WALK_STEPS} values to read, "
                "each '$ref' target counted once per way it is named"
            ), 0
        if isinstance(node, list):
            stack.extend((item, (where, str(i)), depth, times) for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        totals.nodes += times
        if totals.nodes > MAX_SCHEMA_NODES:
            return (
                f"{_spell(where)}: the schema asks llama.cpp to build more than {MAX_SCHEMA_NODES} "
                "schemas (each '$ref' target once, a schema listing several 'type's once per "
                "type)"
            ), 0
        height = max(height, depth)
        ref = node.get("$ref")
        if isinstance(ref, str):
            # llama.cpp builds the target and ignores the reference's other keywords.
            if ref.startswith("#/"):
                refs.append((depth, ref))
            continue
        if not _COUNTED.isdisjoint(node):
            found = _node_problem(node, where, times, totals)
            if found is not None:
                return found, 0
        kinds = node.get("type")
        # llama.cpp builds a copy of the whole schema for each listed type.
        inner = times * len(kinds) if isinstance(kinds, list) and kinds else times
        for key, value in node.items():
            if key in _NOT_SCHEMAS or key in _BUILT_ONLY_BY_REF:
                continue
            if key in NAMED_SCHEMAS and isinstance(value, dict):
                # Each value a schema whatever its name, a level below the map, as before.
                at = (where, str(key))
                stack.extend(
                    (schema, (at, name), depth + 2, inner) for name, schema in value.items()
                )
            elif isinstance(value, dict | list):
                stack.append((value, (where, str(key)), depth + 1, inner))
    return None, height


def _node_problem(node: dict[str, Any], at: _Where, times: int, totals: _Totals) -> str | None:
    problem = _node_problem_text(node, times, totals)
    return None if problem is None else f"{_spell(at)}: {problem}"


def _node_problem_text(node: dict[str, Any], times: int, totals: _Totals) -> str | None:
    values = node.get("enum")
    if isinstance(values, list) or "const" in node:
        totals.enum_values += times * (len(values) if isinstance(values, list) else 1)
        if totals.enum_values > MAX_ENUM_VALUES:
            key = "enum" if isinstance(values, list) else "const"
            return (
                f"'{key}' brings the schema's enum and const values to more than "
                f"{MAX_ENUM_VALUES} (OpenAI's limit): llama.cpp tries each on every token"
            )
    for key in ("anyOf", "oneOf"):
        branches = node.get(key)
        if isinstance(branches, list):
            # `{"type": "null"}` is how Pydantic and zod write an optional field: it
            # matches only `null`, so it costs nothing beside the other branch, and one
            # branch is no choice at all.
            counted = sum(1 for branch in branches if branch != _NULL)
            totals.alternatives += times * counted if counted > 1 else 0
            if totals.alternatives > MAX_ALTERNATIVES:
                return (
                    f"'{key}' brings the schema's anyOf and oneOf alternatives (other than "
                    f'{{"type": "null"}}) to more than {MAX_ALTERNATIVES}: llama.cpp may try '
                    "each on every token"
                )
    properties = node.get("properties")
    if isinstance(properties, dict):
        totals.properties += times * len(properties)
        if totals.properties > MAX_PROPERTIES:
            return (
                f"'properties' brings the schema's properties to more than "
                f"{MAX_PROPERTIES} (OpenAI's limit)"
            )
        required = node.get("required")
        named = (
            {name for name in required if isinstance(name, str)}
            if isinstance(required, list)
            else set()
        )
        optional = sum(1 for name in properties if name not in named)
        if node.get("additionalProperties", False) is not False:
            optional += 1
        totals.optional_cost += times * optional * optional
        if totals.optional_cost > MAX_OPTIONAL_PROPERTIES_COST:
            return (
                f"'properties' has too many optional properties ({optional} here): "
                "llama.cpp's grammar grows with the square of an object's optional "
                "properties, and the schema's objects may have at most 256 of them in one, "
                "or fewer in several (the sum of their squares at most 65536)"
            )
    pattern = node.get("pattern")
    # llama.cpp skips only an empty pattern; an unanchored one costs it the same copy.
    if isinstance(pattern, str) and pattern:
        totals.patterns += times
        if totals.patterns > MAX_PATTERNS:
            return (
                f"'pattern' brings the schema's patterns to more than {MAX_PATTERNS}: "
                "llama.cpp's work on each grows with the whole schema"
            )
        ambiguity = pattern_ambiguity(pattern)
        if ambiguity > MAX_PATTERN_AMBIGUITY:
            return (
                f"'pattern' can be read in more than {MAX_PATTERN_AMBIGUITY} ways at once "
                f"(about {ambiguity}: pieces that can be skipped, or can end where the next "
                "begins, in a row, repetitions multiplying): llama.cpp follows every way "
                "on each token"
            )
    return None


def _effective_depth(local: dict[str, int], edges: dict[str, list[tuple[int, str]]]) -> int:
    """How deep llama.cpp may recurse: the longest path through the units, each entered at
    the depth of the reference that first meets it. References may form cycles (llama.cpp
    stops at one it is already building), and then the order it meets them in decides the
    path: a group of units that reach each other may all lie on one path, so the group
    counts the sum of its heights. Tarjan's strongly connected components, iteratively."""
    out = {unit: [(d, t) for d, t in edges.get(unit, ()) if t in local] for unit in local}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    group_of: dict[str, int] = {}
    group_height: list[int] = []
    on_stack: list[str] = []
    stacked: set[str] = set()
    work: list[tuple[str, int]] = [("#", 0)]
    while work:
        unit, i = work.pop()
        if i == 0:
            index[unit] = low[unit] = len(index)
            on_stack.append(unit)
            stacked.add(unit)
        if i < len(out[unit]):
            work.append((unit, i + 1))
            target = out[unit][i][1]
            if target not in index:
                work.append((target, 0))
            elif target in stacked:
                low[unit] = min(low[unit], index[target])
            continue
        for _, target in out[unit]:
            if target in stacked:
                low[unit] = min(low[unit], low[target])
        if low[unit] != index[unit]:
            continue
        # `unit` closes a group: every unit it reaches outside it is already measured.
        members = []
        while True:
            member = on_stack.pop()
            stacked.discard(member)
            group_of[member] = len(group_height)
            members.append(member)
            if member == unit:
                break
        group = len(group_height)
        own = sum(local[m] for m in members)
        beyond = max(
            (
                d + group_height[group_of[t]]
                for m in members
                for d, t in out[m]
                if group_of.get(t, group) != group
            ),
            default=0,
        )
        group_height.append(
            own + beyond
            if len(members) > 1 or _loops(out, unit)
            else max([local[unit]] + [d + group_height[group_of[t]] for d, t in out[unit]])
        )
    return group_height[group_of["#"]]


def _loops(out: dict[str, list[tuple[int, str]]], unit: str) -> bool:
    return any(target == unit for _, target in out[unit])


def _resolve(root: Any, ref: str) -> Any:
    """The value a `#/a/b` reference names, as llama.cpp reads it (no `~` escapes), or None."""
    node = root
    for token in ref[2:].split("/"):
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and (index := _list_index(token)) is not None:
            if index >= len(node):
                return None
            node = node[index]
        else:
            return None
    return node


_SPACE = " \t\n\v\f\r"
_DIGITS = re.compile(r"[0-9]*")


def _list_index(token: str) -> int | None:
    """A list index as llama.cpp reads it (std::stoull: leading white space, a sign, then
    the ASCII digits that follow, the rest ignored: "+0", " 0" and "0x" name item 0), or
    None where it finds none or overflows (it refuses the reference then). Not int():
    that reads any script's digits and refuses more than 4300 of them."""
    rest = token.lstrip(_SPACE)
    negative = rest.startswith("-")
    if rest[:1] in ("+", "-"):
        rest = rest[1:]
    found = _DIGITS.match(rest)
    digits = found.group() if found else ""
    significant = digits.lstrip("0")
    if not digits or len(significant) > 20:
        return None
    value = int(significant or "0")
    if value >= 1 << 64:
        return None
    return (-value) % (1 << 64) if negative else value  # stoull wraps a negative around


def pattern_ambiguity(pattern: str) -> int:
    """How many parses llama.cpp may keep at once for an anchored `pattern`: its pieces
    that can be skipped, or that may end where what follows could begin, in a row,
    repetitions multiplying. llama.cpp ignores a pattern without `^...$` or with anything
    it cannot translate (`\\d`, `\\w`, `\\s`, `\\/`, a lookahead, an inner `^`: it
    accepts any string instead), and reports a malformed one: all are 0 here."""
    if len(pattern) <= _CACHED_PATTERN_CHARS:
        return _cached_ambiguity(pattern)
    return _ambiguity(pattern)


_CACHED_PATTERN_CHARS = 256
"""Patterns up to this long have their reading kept (1024 of them, at most 256 KB): the
same tool schemas come back with every request, and reading one costs 10 to 30 us."""


@lru_cache(maxsize=1024)
def _cached_ambiguity(pattern: str) -> int:
    return _ambiguity(pattern)


def _ambiguity(pattern: str) -> int:
    if len(pattern) < 2 or pattern[0] != "^" or pattern[-1] != "$":
        return 0
    try:
        summary, _ = _Regex(pattern[1:-1]).sequence()
    except _Malformed:
        return 0
    return summary[1]


class _Malformed(Exception):
    """A pattern llama.cpp does not build: malformed, or beyond what it translates."""


_LITERAL_ESCAPES = frozenset("^$.[]()|{}*+?")
"""Escapes llama.cpp turns into a literal character outside a class."""

_GBNF_ESCAPES = frozenset('trn\\"[]-')
"""Escapes llama.cpp copies into GBNF as they are (`gbnf_escape_length`), with `\\xHH`,
`\\uHHHH` and `\\UHHHHHHHH`: any other (`\\d`, `\\w`, `\\s`, `\\/`, `\\b`) makes it drop the
whole pattern and accept any string, so nothing in it is matched token by token."""

_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


class _Regex:
    """A recursive-descent reading of llama.cpp's pattern subset: each part gives what it
    is to the matcher (gbnf.Summary), combined as for a raw grammar. A parse is kept per
    way of reading the text so far, so a part weighs where it can end in more than one
    place: it can match nothing, or one of its matches goes on with a character that could
    also begin what follows."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.depth = 0

    def sequence(self) -> tuple[Summary, bool]:
        """The alternatives up to the end or a ')', and whether a ')' ended them."""
        branches: list[Summary] = []
        parts: list[Summary] = []
        closed = False
        while self.i < len(self.text):
            c = self.text[self.i]
            if c == ")":
                self.i += 1
                closed = True
                break
            if c == "|":
                self.i += 1
                branches.append(join_sequence(parts))
                parts = []
                continue
            parts.append(self.quantified())
        branches.append(join_sequence(parts))
        return join_alternatives(branches), closed

    def quantified(self) -> Summary:
        part = self.atom()
        text, n = self.text, len(self.text)
        while self.i < n and text[self.i] in "?*+{":
            c = text[self.i]
            high: int | None
            if c == "{":
                end = text.find("}", self.i)
                if end < 0:
                    raise _Malformed
                parts = text[self.i + 1 : end].split(",")
                self.i = end + 1
                try:
                    low = int(parts[0]) if parts[0].strip() else 0
                    high = int(parts[-1]) if len(parts) == 1 or parts[1].strip() else None
                except ValueError:
                    raise _Malformed from None
                if len(parts) > 2:
                    raise _Malformed
            else:
                self.i += 1
                low = 1 if c == "+" else 0
                high = 1 if c == "?" else None
            if self.i < n and text[self.i] in "?+":  # lazy/possessive: same language
                self.i += 1
            # `(a?){0,100}`: 6 s for one token; `(a{1,10}){0,1000}`: 49 s for 100 tokens;
            # unbounded (`(a?)*`, `((a?)*)*` ten deep, the URL pattern `([/a-z .-]*)*`):
            # each under 0.3 s for 16 tokens.
            part = repeat_summary(part, low, high)
        return part

    def atom(self) -> Summary:
        text, n = self.text, len(self.text)
        c = text[self.i]
        if c == "(":
            self.depth += 1
            if self.depth > 100:  # llama.cpp refuses deeper patterns
                raise _Malformed
            self.i += 1
            if text.startswith("?:", self.i):
                self.i += 2
            elif text.startswith("?", self.i):
                raise _Malformed  # a lookaround or named group: llama.cpp takes any string
            part, closed = self.sequence()
            if not closed:
                raise _Malformed
            self.depth -= 1
            return part
        if c == "[":
            self.i += 1
            negated = self.i < n and text[self.i] == "^"
            if negated:
                self.i += 1
            chars: set[str] | None = set()
            if self.i < n and text[self.i] == "]":
                self.i += 1
                chars = {"]"}
            while self.i < n and text[self.i] != "]":
                bottom = self.char(in_class=True)
                if text.startswith("-", self.i) and self.i + 1 < n and text[self.i + 1] != "]":
                    self.i += 1
                    top = self.char(in_class=True)
                    chars = add_span(chars, bottom, top)
                elif chars is not None:
                    chars.add(bottom)
            self.i += 1
            found: Chars = ANY if chars is None else (negated, frozenset(chars))
            return False, 0, found, NOTHING, found, 1, 1
        if c in "?*+{":
            raise _Malformed  # nothing to repeat
        if c in "^$":
            raise _Malformed  # an anchor inside: llama.cpp takes any string
        if c == ".":
            self.i += 1
            return False, 0, ANY, NOTHING, ANY, 1, 1
        one: Chars = (False, frozenset(self.char(in_class=False)))
        return False, 0, one, NOTHING, one, 1, 1

    def char(self, in_class: bool) -> str:
        """The character at `i` (an escape's, as llama.cpp translates it), moving past it;
        _Malformed for an escape it does not translate (it then builds no rule from the
        pattern)."""
        text = self.text
        if text[self.i] != "\\":
            self.i += 1
            return text[self.i - 1]
        kind = text[self.i + 1 : self.i + 2]
        if (not in_class and kind in _LITERAL_ESCAPES) or kind in _GBNF_ESCAPES:
            self.i += 2
            return _ESCAPED.get(kind, kind)
        size = _HEX_ESCAPES.get(kind) if kind else None
        digits = text[self.i + 2 : self.i + 2 + size] if size else ""
        if size is None or len(digits) != size or not _HEX_DIGITS.issuperset(digits):
            raise _Malformed
        self.i += 2 + size
        return chr(min(int(digits, 16), 0x10FFFF))


_ESCAPED = {"t": "\t", "r": "\r", "n": "\n"}


_Where = str | tuple[Any, str]
"""A JSON pointer: the unit's own, or (the parent's, a key or index)."""


def _spell(where: _Where) -> str:
    tokens: list[str] = []
    while isinstance(where, tuple):
        where, token = where
        tokens.append(_pointer_token(token))
    return "/".join([where, *reversed(tokens)])


def _pointer_token(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")
