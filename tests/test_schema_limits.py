"""JSON schemas that would crash llama-server or burn its slot after the client left
(render/schema_limits.py), refused with a 400 naming the keyword and a JSON pointer before
they reach llama.cpp; realistic schemas (agents' tools, OpenAI structured outputs at
OpenAI's own limits) pass. Each refused shape was measured against llama-server b11434
(docs/compatibility.md); tests/e2e/test_openai_sdk.py sends some through the gateway to a
real one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from llamacpp_proxy.render.grammar_guard import schema_problem
from llamacpp_proxy.render.schema_limits import MAX_WALK_STEPS, pattern_ambiguity

from .conftest import UNLIMITED_KEY, Stack, forced_tool_call

AUTH = {"Authorization": f"Bearer {UNLIMITED_KEY}"}
CHAT = [{"role": "user", "content": "hi"}]


def ref_chain(n: int) -> dict[str, Any]:
    """`$defs` each referring to the next: 7000 crashed llama-server."""
    defs: dict[str, Any] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
    defs[f"d{n}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def object_chain(n: int) -> dict[str, Any]:
    """Objects each referring to the next: 5000 crashed llama-server."""
    defs: dict[str, Any] = {
        f"d{i}": {
            "type": "object",
            "properties": {"next": {"$ref": f"#/$defs/d{i + 1}"}},
            "required": ["next"],
        }
        for i in range(n)
    }
    defs[f"d{n}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def listed_types(levels: int) -> dict[str, Any]:
    """llama.cpp rebuilds the schema once per listed type: 2^20 builds burned its slot."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": ["object", "object"], "properties": {"x": schema}, "required": ["x"]}
    return schema


def flat(properties: int, required: bool = True) -> dict[str, Any]:
    names = [f"field_{i}" for i in range(properties)]
    return {
        "type": "object",
        "properties": {name: {"type": "integer"} for name in names},
        **({"required": names} if required else {}),
    }


def objects(count: int, properties: int, required: bool = True) -> dict[str, Any]:
    one = flat(properties, required)
    return {
        "type": "object",
        "properties": {f"o{i}": one for i in range(count)},
        "required": [f"o{i}" for i in range(count)],
    }


def patterned(count: int, pattern: str) -> dict[str, Any]:
    """An object of `count` required string properties, each with this `pattern`."""
    return {
        "type": "object",
        "properties": {f"p{i}": string(pattern) for i in range(count)},
        "required": [f"p{i}" for i in range(count)],
    }


def named(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """An object whose one property, `name`, has this schema."""
    return {"type": "object", "properties": {name: schema}, "required": [name]}


def string(pattern: str) -> dict[str, Any]:
    return {"type": "string", "pattern": pattern}


def nested_arrays(levels: int, low: int, high: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "array", "minItems": low, "maxItems": high, "items": schema}
    return schema


REFUSED = [
    # (schema, words in the problem, JSON pointer it names)
    (ref_chain(20000), "more than", "#"),  # the schemas it builds are too many first
    (ref_chain(600), "levels deep", "#"),
    (object_chain(20000), "more than", "#"),
    (object_chain(300), "levels deep", "#"),
    (
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/d0"}}, **ref_chain(600)},
        "levels deep",
        "#",
    ),
    (listed_types(20), "more than", "#/properties/x"),
    ({"enum": [f"v{i}" for i in range(50000)]}, "'enum'", "#"),
    ({"enum": [f"v{i}" for i in range(1001)]}, "'enum'", "#"),
    (
        {  # 1001 in all, over two properties, a const among them
            "type": "object",
            "properties": {
                "a": {"enum": list(range(500))},
                "b": {"enum": list(range(500))},
                "c": {"const": "x"},
            },
        },
        "enum and const values",
        "#/properties/",
    ),
    ({"anyOf": [{"const": i} for i in range(1001)]}, "enum and const values", "#/anyOf/"),
    ({"anyOf": [{"type": "integer", "minimum": i} for i in range(2001)]}, "'anyOf'", "#"),
    (objects(2, 2500), "'properties'", "#/properties/o"),
    (flat(2000, required=False), "optional properties", "#"),
    (flat(257, required=False), "optional properties", "#"),
    (objects(2, 200, required=False), "optional properties", "#/properties/o"),
    (
        patterned(257, "^[a-z]+$"),
        "patterns to more than 256",
        "#/properties/p",
    ),
    # Regression: only anchored patterns were counted, yet llama.cpp copies its rules for
    # each pattern it then drops for any string (5000 of them: 2.2 s before the first
    # token, the core busy on after the client left).
    (
        patterned(257, "[a-z]+"),
        "patterns to more than 256",
        "#/properties/p",
    ),
    (
        {"type": "array", "prefixItems": [string("^\\d+$") for _ in range(5000)]},
        "patterns to more than 256",
        "#/prefixItems/",
    ),
    (string("^((a{0,1000}){0,1000}){0,1000}$"), "'pattern'", "#"),
    (string("^((a{0,100}){0,100})$"), "'pattern'", "#"),
    (string("^(a{0,2}){0,300}$"), "'pattern'", "#"),
    (string("^" + "a?" * 300 + "$"), "'pattern'", "#"),
    (string("^" + "(a?)*" * 33 + "$"), "'pattern'", "#"),
    (string("^(?:x|y?z?){0,20}$"), "'pattern'", "#"),
    # Regression: each copy may end where the next begins, and llama.cpp kept a parse per
    # place (49 s of a core for 100 tokens; `(a|aa){0,1000}` 9 s, the same text unambiguous
    # 2 s), and the count of unambiguous pieces did not see it.
    (string("^((a{1,10}){0,1000})$"), "'pattern'", "#"),
    (string("^(a|aa){0,1000}$"), "'pattern'", "#"),
    (string("^(a|aa){33}$"), "'pattern'", "#"),
    (
        {"type": "array", "items": {"$ref": "#/$defs/s"}, "$defs": {"s": string("^(a?){33}$")}},
        "'pattern'",
        "#/$defs/s",
    ),
]


@pytest.mark.parametrize(
    ("schema", "words", "where"), REFUSED, ids=[f"{i}-{r[1]}" for i, r in enumerate(REFUSED)]
)
def test_a_schema_llamacpp_cannot_survive_is_found(schema: Any, words: str, where: str) -> None:
    problem = schema_problem(schema)
    assert problem is not None and words in problem, problem
    assert problem.startswith(where), problem


def pydantic_like_tool() -> dict[str, Any]:
    """A large agent tool schema, in the shape Pydantic and zod write them: `$defs`, a
    recursive tree, Optional fields as `anyOf [X, null]`, enums, formats and patterns."""
    defs: dict[str, Any] = {
        "Node": {  # recursive: llama.cpp makes it a recursive rule
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 200},
                "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                "parent": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]},
            },
            "required": ["name"],
        },
        "A": {"type": "object", "properties": {"b": {"$ref": "#/$defs/B"}}},
        "B": {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}},
        "Country": {"type": "string", "enum": [f"C{i:03}" for i in range(250)]},
    }
    for i in range(60):
        defs[f"Model{i}"] = {
            "type": "object",
            "description": f"Model {i}",
            "properties": {
                "id": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"},
                "email": {"type": ["string", "null"], "format": "email"},
                "phone": string(r"^(\+\d{1,3}\s?)?\(?\d{3}\)?[\s.-]?\d{3}[\s.-]?\d{4}$"),
                "amount": string(r"^-?\d+(\.\d+)?([eE][+-]?\d+)?$"),
                "when": string(
                    r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2})?(\.\d+)?(Z|[+-]\d{2}:\d{2})?)?$"
                ),
                "country": {"$ref": "#/$defs/Country"},
                "status": {"type": "string", "enum": ["open", "closed", "pending"]},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 20},
                "tree": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]},
                "next": {"anyOf": [{"$ref": f"#/$defs/Model{i + 1}"}, {"type": "null"}]}
                if i < 59
                else {"type": "null"},
                **{
                    f"opt{j}": {"anyOf": [{"type": "integer"}, {"type": "null"}]} for j in range(20)
                },
            },
            "required": ["id", "status"],
            "additionalProperties": False,
        }
    return {
        "type": "object",
        "properties": {
            "models": {"type": "array", "items": {"$ref": "#/$defs/Model0"}},
            "a": {"$ref": "#/$defs/A"},
            "self": {"$ref": "#"},  # llama.cpp refuses it itself (not "#/"): passed on
        },
        "required": ["models"],
        "$defs": defs,
    }


def openai_at_its_limits() -> dict[str, Any]:
    """OpenAI's structured-output limits, each about reached: 5000 properties, 1000 enum
    values, 10 levels of nesting."""
    schema = objects(98, 50)
    schema["properties"]["o0"] = {
        "type": "object",
        "properties": {f"e{i}": {"enum": [f"v{j}" for j in range(100)]} for i in range(10)},
        "required": [f"e{i}" for i in range(10)],
        "additionalProperties": False,
    }
    nested: dict[str, Any] = {"type": "string"}
    for _ in range(10):
        nested = {"type": "object", "properties": {"x": nested}, "required": ["x"]}
    schema["properties"]["o1"] = nested
    return schema


def flat_optional_nullable(properties: int) -> dict[str, Any]:
    field = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    names = [f"f{i}" for i in range(properties)]
    return {
        "type": "object",
        "properties": dict.fromkeys(names, field),
        "required": names,
    }


def deep_items(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


PASSING = [
    pydantic_like_tool(),
    openai_at_its_limits(),
    flat(5000),
    flat(256, required=False),
    {"enum": list(range(1000))},
    {"anyOf": [{"type": "integer", "minimum": i} for i in range(2000)] + [{"type": "null"}]},
    flat_optional_nullable(5000),  # OpenAI's 5000 properties, each written as Pydantic does
    deep_items(250),  # as deep as the gateway's JSON depth limit lets a plain schema go
    ref_chain(500),
    object_chain(150),
    {"$defs": {"x": {"$ref": "#/$defs/x"}}, "$ref": "#/$defs/x"},  # a cycle: llama.cpp's fine
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"$ref": "#/$defs/missing"},  # llama.cpp answers it with a 400
    {"$defs": {f"d{i}": {"enum": list(range(1000))} for i in range(50)}},  # never built
    {"type": ["string", "null", "integer"]},
    listed_types(12),
    string("^[a-z]{1,64}$"),
    string("^.{0,2000}$"),
    string("^(ab?){0,2000}$"),  # not ambiguous: every repetition starts with an 'a'
    string("^(a?){32}$"),
    string("^(a|aa){32}$"),
    string("^.{0,64}" + "abcdefghijklmnopqrstuvwxyz" * 4 + "$"),
    string("^([a-z0-9]+-){0,2000}[a-z0-9]+$"),
    string("^[a-z]{1,10}( [a-z]{1,10}){0,2000}$"),
    # Regression: refused as ambiguous, yet each an unbounded repetition llama.cpp answers
    # at once (measured on b11434: under 0.3 s for 16 tokens).
    string("^(a?)*$"),
    string("^" + "(" * 10 + "a?" + ")*" * 10 + "$"),
    string("^(https?://)?([0-9a-z.-]+)\\.([a-z.]{2,6})([/a-zA-Z0-9_ .-]*)*/?$"),
    string("^([a-z ]*[0-9 ]*[.,;: -]*)*$"),
    string("(a{0,2}){0,300}"),  # unanchored: llama.cpp takes any string
    string("^(a{0,2}){0,300"),  # malformed: llama.cpp reports it
    {
        "type": "object",
        "properties": {f"p{i}": string("^[a-z]+$") for i in range(128)}
        | {f"q{i}": string("[a-z]+") for i in range(128)},
        "required": [f"p{i}" for i in range(128)] + [f"q{i}" for i in range(128)],
    },
    # Measured harmless (docs/compatibility.md): each array level is rules that refer to
    # the item's rule by name, so nesting multiplies nothing (200 tokens in 3.9 s of a core,
    # 3.5 s without a grammar; memory up 2 to 6 MB).
    nested_arrays(4, 0, 1000),
    nested_arrays(20, 1000, 1000),
    {  # an empty pattern is no pattern to llama.cpp
        "type": "array",
        "prefixItems": [string("") for _ in range(5000)],
    },
]


@pytest.mark.parametrize("schema", PASSING, ids=[str(i) for i in range(len(PASSING))])
def test_realistic_and_limit_schemas_pass(schema: Any) -> None:
    assert schema_problem(schema) is None


SCHEMAS = Path(__file__).parent / "data" / "schemas"


@pytest.mark.parametrize("name", sorted(path.name for path in SCHEMAS.glob("*.json")))
def test_schemas_real_clients_generate_pass(name: str) -> None:
    """What Pydantic v2's `model_json_schema()` (nested, recursive, Optional, Union,
    Literal, Enum, discriminated unions), the OpenAI SDK's `parse()` and
    `pydantic_function_tool` (strict) and LangChain's `with_structured_output` (strict)
    write for a few models, and a schema using `patternProperties`, `prefixItems`,
    `if/then/else`, `allOf`, formats and common patterns (emails, UUIDs, ISO dates, phone
    numbers, semver, URLs, IPv4, cron). Regression: the URL pattern in the last was
    refused as ambiguous, though llama.cpp takes any string for it (its `\\/` and `\\w`)."""
    assert schema_problem(json.loads((SCHEMAS / name).read_text())) is None


REAL_PATTERNS = json.loads((Path(__file__).parent / "data" / "patterns.json").read_text())


@pytest.mark.parametrize("pattern", REAL_PATTERNS["patterns"])
def test_patterns_real_clients_send_pass(pattern: str) -> None:
    """Validation regexes as real schemas carry them (tests/data/patterns.json has their
    provenance). Regression: `^(?:[0-9a-fA-F]{2}){1,4096}$`, from a public Pydantic model,
    was refused as read 4096 ways at once (each copy ends in one place, after its second
    character), though llama-server ran it as fast as `^[0-9a-fA-F]{2,2000}$`."""
    schema = {"type": "object", "properties": {"v": {"type": "string", "pattern": pattern}}}
    assert schema_problem(schema) is None


@pytest.mark.parametrize(
    ("pattern", "weight"),
    [
        ("^abc$", 0),
        ("^a?b?c$", 2),
        ("^a?b(c?d?e?)f$", 3),
        ("^(a?){0,10}$", 10),
        ("^((a?){0,10}){0,10}$", 100),
        ("^(a{0,3}){0,100}$", 100),
        # Regression: a copy that can end where the next begins was counted as nothing,
        # yet the next copy may then start at many places: `^((a{1,10}){0,1000})$` took
        # 49 s of a core for 100 tokens of "aaaa" (the same grammar without it: 2 s).
        ("^(a{1,3}){0,100}$", 100),
        ("^(a|aa){0,100}$", 100),
        ("^(a|b){0,100}$", 1),  # alternatives that begin differently: one parse
        ("^(ab?){0,100}$", 1),  # a copy ends before its 'b', the next begins with 'a'
        ("^(a|ab){0,100}$", 100),  # 'a' is a prefix of 'ab'
        ("^([a-z]+,){0,100}$", 1),
        ("^[0-9]{1,3}(\\.[0-9]{1,3}){3}$", 0),
        # A fixed count of copies that each end in one place ends in one place: 22 ms a
        # token in llama-server, as `[0-9a-fA-F]{2,2000}`. Copies that may end in two
        # (`{1,2}`) are ambiguous: `^([0-9a-fA-F]{1,2}){1,1000}$` took 78 ms a token.
        ("^(?:[0-9a-fA-F]{2}){1,4096}$", 0),
        ("^([0-9a-fA-F]{1,2}){1,1000}$", 1000),
        ("^((a|aa){2}){100}$", 200),
        ("^((a?){2}){100}$", 200),
        # Regression (missed, counted 1): a piece that may begin at each place the last
        # could end keeps a parse per place, counted as `(a|aa){0,n}`'s copies are (a
        # parse per two). 100 tokens of letters: `^[a-z]{1,1000}[a-z]{1,1000}$` 39 ms a
        # token, sixteen such pieces 327 ms (count 15), `^[a-z]{2,2000}$` 22 ms, and
        # `^[a-z]{1,50}[a-z]{0,50}$` 27 ms, as `(a|aa){0,32}`.
        ("^[a-z]{1,1000}[a-z]{1,1000}$", 500),
        ("^" + "[a-z]{1,2000}" * 16 + "$", 15000),
        ("^[a-z]{1,50}[a-z]{0,50}$", 25),
        ("^[a-z]{1,1000}[0-9]{1,1000}$", 0),  # the second cannot begin on a letter
        ("^([a-z0-9]{1,63}\\.){1,126}[a-z]{2,63}$", 1),  # nor go on past a '.'
        ("^[a-z]{1,1000}[a-z]$", 1),  # nor go on past one letter
        ("^(a{1,3}a){0,10}$", 10),  # where the inner repetition ends is open too
        ("^[a-c]{1,5}[c-e]{1,5}$", 1),
        ("^[a-c]{1,5}[d-f]{1,5}$", 0),
        ("^([^,]{1,5}){0,100}$", 100),
        ("^(a+)+$", 2),  # unbounded: one recursive rule
        # A literal after a piece that may still be reading: one parse per way the text's
        # end could be a prefix of it, so distinct letters are one way, a run of one is not.
        ("^.*@example\\.com$", 2),
        ("^[a-z]+" + "abcdefghijklmnopqrstuvwxyz" * 2 + "$", 1),
        ("^.*" + "a" * 40 + "$", 41),
        ("^(x|y?)z?$", 2),
        ("^[?*+]{0,5}\\?*$", 2),  # quantifiers in a class, and an escaped '?', are text
        ("^a{,5}$", 1),
        ("abc?d?", 0),  # unanchored
        # What llama.cpp cannot translate makes it take any string, the pattern unbuilt:
        # an escape it has no GBNF for, in a class or not, a lookaround, an inner anchor.
        ("^(a?){100}\\d$", 0),
        ("^(a?){100}[\\w]$", 0),
        ("^(a?){100}\\/$", 0),
        ("^(?=x)(a?){100}$", 0),
        ("^(a?){100}^$", 0),
        ("^(a?){100}\\xZZ$", 0),
        # Escapes it does translate keep the pattern built.
        ("^(a?){100}\\.\\x41[\\-\\]\\u00e9]$", 100),
        ("^(?:a?){100}$", 100),
    ],
)
def test_pattern_ambiguity_counts_skippable_pieces(pattern: str, weight: int) -> None:
    assert pattern_ambiguity(pattern) == weight


def test_the_walk_stops_at_the_first_bound_passed() -> None:
    """2^200 builds: a walk that followed them all would never end."""
    problem = schema_problem(listed_types(200))
    assert problem is not None and "more than" in problem


def test_references_spelled_differently_are_each_built() -> None:
    """llama.cpp builds a `$ref` target once per spelling of the reference."""
    big = flat(1000)
    spellings = [f"#/properties/{'0' * k}0" for k in range(1, 8)]
    schema = {"type": "array", "prefixItems": [big], "anyOf": [{"$ref": s} for s in spellings]}
    schema["properties"] = [big]
    problem = schema_problem(schema)
    assert problem is not None and "'properties'" in problem, problem


def test_a_list_named_many_ways_is_read_within_a_bound() -> None:
    """Regression: each spelling of a reference to a 40,000-item list was read again, and a
    list's items did not count toward any bound: 400 spellings (89 KiB) took 5.8 s of the
    check and were accepted. Now the values read in all are bounded (MAX_WALK_STEPS)."""
    aliases = ["0" * k for k in range(1, 401)]
    schema = {
        "$defs": {"l": [{"f": [0] * 40_000}]},
        "allOf": [{"$ref": "#/$defs/l/" + alias} for alias in aliases],
    }
    problem = schema_problem(schema)
    assert problem is not None and f"more than {MAX_WALK_STEPS} values" in problem, problem


def test_a_reference_index_is_read_as_llamacpp_reads_it() -> None:
    """llama.cpp reads a list index with std::stoull: white space, a sign and trailing text
    are allowed, another script's digits and an overflow are not (it refuses the reference).
    Regression: int() read the Arabic-Indic zero as 0, and 5000 digits raised ValueError
    (a 500); the other spellings below were not read at all, so the pattern behind them
    went unchecked."""
    target = [{"type": "string", "pattern": "^(a?){0,99}$"}]
    for index in ["0", "+0", " 0", "-0", "0x", "0" * 5000]:
        schema = {"$defs": {"l": target}, "$ref": "#/$defs/l/" + index}
        assert "ways at once" in (schema_problem(schema) or ""), index
    for index in ["\u0660", "1" * 5000, "x", "", "1"]:
        schema = {"$defs": {"l": target}, "$ref": "#/$defs/l/" + index}
        assert schema_problem(schema) is None, index  # names nothing: llama.cpp refuses it


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {
                "messages": CHAT,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": ref_chain(20000)},
                },
            },
            "response_format",
        ),
        ("/v1/completions", {"prompt": "hi", "json_schema": listed_types(20)}, "json_schema"),
        (
            "/v1/completions",
            {"prompt": "hi", "json_schema": {"enum": list(range(50000))}},
            "json_schema",
        ),
        (
            "/v1/chat/completions",
            forced_tool_call(
                {"type": "object", "properties": {"s": string("^((a{0,100}){0,100})$")}}
            ),
            "tools",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": CHAT,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": string("^(a|aa){0,1000}$")},
                },
            },
            "response_format",
        ),
        (
            "/v1/completions",
            {
                "prompt": "hi",
                "json_schema": patterned(5000, "[a-z]+"),
            },
            "json_schema",
        ),
        (
            "/v1/responses",
            {
                "input": "hi",
                "text": {
                    "format": {
                        "type": "json_schema",
                        "name": "x",
                        "schema": flat(2000, required=False),
                    }
                },
            },
            None,
        ),
        # A property's name is not a keyword: properties named like one ("type",
        # "default", ...) are built by llama.cpp all the same.
        (
            "/v1/completions",
            {"prompt": "hi", "json_schema": named("type", string("^(a|aa){0,1000}$"))},
            "json_schema",
        ),
        (
            "/v1/completions",
            {"prompt": "hi", "json_schema": named("enum", string("^(a|aa){0,1000}$"))},
            "json_schema",
        ),
        (
            "/v1/chat/completions",
            forced_tool_call(named("default", {"type": "string", "minLength": 5, "maxLength": 1})),
            "tools",
        ),
    ],
    ids=[
        "ref-chain",
        "listed-types",
        "enum",
        "tool-pattern",
        "ambiguous-pattern",
        "unanchored-patterns",
        "responses-optional",
        "property-named-type",
        "property-named-enum",
        "property-named-default",
    ],
)
def test_a_schema_llamacpp_cannot_survive_is_a_400_and_never_sent(
    stack: Stack, path: str, body: Any, param: str | None
) -> None:
    """Regression: each went to llama.cpp, which crashed (the `$ref` chain) or kept a core
    busy long after the client left (the rest)."""
    with httpx.Client(base_url=stack.url, headers=AUTH) as client:
        r = client.post(path, content=json.dumps({**body, "max_tokens": 4}))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_json_schema", error
        assert error["message"].count("#") >= 1, error  # a JSON pointer into the schema
        if param is not None:
            assert error["param"] == param, error
        assert not stack.fake.requests  # never reached llama.cpp
        ok = client.post("/v1/completions", content=json.dumps({"prompt": "hi"}))
        assert ok.status_code == 200  # the same connection goes on serving


def test_a_large_realistic_schema_reaches_llamacpp(stack: Stack) -> None:
    schema = pydantic_like_tool()
    response_format = {"type": "json_schema", "json_schema": {"name": "save", "schema": schema}}
    body = {"messages": CHAT, "response_format": response_format, "max_tokens": 4}
    with httpx.Client(base_url=stack.url, headers=AUTH) as client:
        r = client.post("/v1/chat/completions", content=json.dumps(body))
    assert r.status_code == 200, r.text
    assert stack.fake.requests[0]["json_schema"] == schema


def test_real_patterns_reach_llamacpp_and_a_missed_ambiguity_is_refused(stack: Stack) -> None:
    """Every pattern of tests/data/patterns.json in one tool-like schema reaches llama.cpp;
    sixteen `[a-z]{1,2000}` in a row (327 ms a token in llama-server, once counted 15) is
    a 400 on the same kept-alive connection, which then serves the first schema again."""
    real = {
        "type": "object",
        "properties": {
            f"p{i}": {"type": "string", "pattern": p}
            for i, p in enumerate(REAL_PATTERNS["patterns"])
        },
    }
    slow = {"type": "string", "pattern": "^" + "[a-z]{1,2000}" * 16 + "$"}
    with httpx.Client(base_url=stack.url, headers=AUTH) as client:

        def send(schema: Any) -> httpx.Response:
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": "s", "schema": schema},
            }
            body = {"messages": CHAT, "response_format": response_format, "max_tokens": 4}
            return client.post("/v1/chat/completions", content=json.dumps(body))

        assert send(real).status_code == 200
        refused = send(slow)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "invalid_json_schema", error
        assert "ways at once" in error["message"], error
        assert send(real).status_code == 200
    assert [r["json_schema"] for r in stack.fake.requests] == [real, real]
