"""Output constraints, merged once: `response_format`, llama.cpp's `json_schema` and
`grammar`, and the schema a forced `tool_choice` implies (pure: no I/O).

llama.cpp takes one constraint per generation. A request that carries two would have one
silently replaced by the other (the model then ignores a forced tool call, or a response
format), so two are refused with a 400 naming the second; one is put where the upstream
mapping reads it, and nothing else can override it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequest
from ..request import CompletionRequest
from .grammar_guard import grammar_problem, schema_problem
from .tool_calls import forced_call_schema, rebase_tool_references

# In this order, the first is the one kept in the error message, the second is the `param`.
_SOURCES = ("response_format", "json_schema", "grammar", "tool_choice")


@dataclass(frozen=True, slots=True)
class Constraint:
    """The request's one output constraint, by where it came from (none: empty), still to be
    checked against what would hang llama.cpp's grammar builder (`check`)."""

    found: dict[str, Any]
    forced: bool
    """The constraint is a forced tool call's."""
    names: Mapping[str, str] = field(default_factory=dict)
    """The front door's name for a source, where it is not the source's (Responses:
    `text.format` for `response_format`), for the 400's `param` and message."""

    def check(self) -> None:
        """Finish the constraint as llama.cpp gets it (a forced call's tool references
        pointed where they sit), then raise InvalidRequest (400) for one llama.cpp cannot
        build (grammar_guard.py). CPU work proportional to the constraint's size: see
        frontdoor/constraint_check.py for where it runs."""
        if self.forced:
            rebase_tool_references(self.found["tool_choice"])
        _refuse_what_llamacpp_cannot_build(self.found, self.names)


def merge_constraints(
    request: CompletionRequest,
    tools: list[dict[str, Any]] | None,
    names: Mapping[str, str] | None = None,
) -> Constraint:
    """Leave the request with at most one output constraint: a JSON schema in
    `request.json_schema` or a GBNF `grammar` in its extensions. InvalidRequest when the
    request carries two (named as the front door names them: `names`). The constraint kept
    is returned unchecked (Constraint.check)."""
    names = names or {}
    extensions = request.extensions
    found: dict[str, Any] = {}
    if request.json_schema is not None:
        found["response_format"] = request.json_schema
    if "json_schema" in extensions:
        found["json_schema"] = extensions.pop("json_schema")
    if "grammar" in extensions:
        found["grammar"] = extensions["grammar"]
    forced = forced_call_schema(tools, request.tool_choice) if tools else None
    if forced is not None:
        found["tool_choice"] = forced
    if len(found) > 1:
        first, second = [names.get(name, name) for name in _SOURCES if name in found][:2]
        raise InvalidRequest(
            f"'{second}' and '{first}' both constrain the output, and llama.cpp applies one "
            f"constraint per generation; send only one of them.",
            param=second,
            code="conflicting_constraints",
        )
    if "grammar" not in found:
        request.json_schema = next(iter(found.values()), None)
    return Constraint(found, forced is not None, names)


def _refuse_what_llamacpp_cannot_build(found: dict[str, Any], names: Mapping[str, str]) -> None:
    """A 400 for a constraint that would hang llama.cpp's grammar builder (grammar_guard.py):
    it matches nothing anyway."""
    for source, constraint in found.items():
        code = "invalid_grammar" if source == "grammar" else "invalid_json_schema"
        try:
            if source == "grammar":
                problem = grammar_problem(constraint) if isinstance(constraint, str) else None
            else:
                problem = schema_problem(constraint)
        except ValueError:
            # int() refuses more than sys.get_int_max_str_digits() (4300) digits: a
            # quantifier's bound that long, which the guards read with int(). Else a 500
            # for what is the client's malformed constraint.
            problem = "holds a number too long to read (more than 4300 digits)"
        if problem is not None:
            # A forced call's schema is the tool's parameters: the client wrote it there.
            param = "tools" if source == "tool_choice" else names.get(source, source)
            raise InvalidRequest(f"'{param}' {problem}.", param=param, code=code)
