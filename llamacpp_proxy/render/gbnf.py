"""Left recursion in a raw GBNF grammar that llama.cpp's own check misses, and how many
ways at once it can be read (pure: no I/O).

llama-server (b11434) refuses `root ::= root "a" | "a"`, but its check only counts a rule as
able to match nothing when one of its alternatives is literally empty. Through a rule that
matches nothing some other way (`x ::= "b"?` compiles to a reference to `x_1 ::= "b" |`),
`root ::= x root "a" | "a"` gets past it, and llama.cpp's stack expansion then pushes
`"a"` and re-enters `root` forever: 2 GB in 4 s, on the thread that took the request.

Measured against that server, what runs away is a cycle of leftmost references (each
reached past elements that can match nothing) in which some reference is followed by
more elements: each turn leaves them on the stack, which grows without end. A cycle of
references that each end their alternative (`root ::= x root | "a"`, `("a"?)*`, which
compiles to `s ::= g s |` with `g` able to match nothing) leaves the stack as it was and
is answered normally, so it passes.

llama.cpp keeps one parse per way of reading the text so far, and checks every candidate
token against each: a grammar read many ways at once (`("a"?){0,300}`, `("a" | "aa"){0,2000}`)
keeps a core busy, after the client left too. `analyse` counts the ways as
render/schema_limits.py counts a pattern's (join_sequence, join_alternatives,
repeat_summary, shared with it).

The parser follows llama.cpp's `parse_rule`/`parse_sequence`/`parse_alternates` (newlines
end a rule except inside groups and after `|`; `"..."` and `[...]` with its escapes; `.`;
`<token>` and `!<token>`; `? * + {m} {m,} {m,n}`; `#` comments). A grammar it cannot parse
is left to llama.cpp, which answers a 400. Work is linear in the grammar and iterative:
a group or a repetition becomes one node (llama.cpp's synthesized rule), and a repetition's
copies collapse to at most two, which reach the same rules with the same stack growth.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import Any

TERMINAL = -1
"""An element that matches a character or token: it can never match nothing."""

_Alternative = list[int]
"""Node ids of a compiled sequence, TERMINAL for characters; empty literals take no place."""

_MAX_REPETITION = 2000
"""llama.cpp's MAX_REPETITION_THRESHOLD: a larger minimum is an error, a larger maximum
means no maximum."""

MAX_EXPANDED_ELEMENTS = 1_000_000
"""Grammar elements llama.cpp may write out for repetitions: it copies a repeated item once
per count (`S{m,n}` is S m times, then n - m rules each holding S), so a 30000-character
literal repeated 2000 times took llama-server (b11434) to 855 MB at once, and it kept
640 MB after the answer. Legitimate repetitions are of a character or a short piece
(`[0-9]{1,2000}` is 4000 elements); this is about 14 MB."""

_ESCAPES = frozenset('tnr\\"[]-')
_HEX = {"x": 2, "u": 4, "U": 8}
_ESCAPED = {"t": "\t", "n": "\n", "r": "\r"}


Chars = tuple[bool, frozenset[str]]
"""A set of characters (or of whole tokens, `<t>`): (False, these) or (True, all but these),
as a class `[^...]` reads."""

NOTHING: Chars = (False, frozenset())
ANY: Chars = (True, frozenset())

WIDE_RANGE = 256
"""A class range wider than this counts as any character: sets stay small."""

_MAX_WEIGHT = 1 << 20

_Piece = tuple[Any, ...]
"""A part of a sequence as written, for the ambiguity count: (0, first, every) a terminal,
(1, node) a reference or group, (2, piece, low, high) a repetition (high None: no maximum)."""

Summary = tuple[bool, int, Chars, Chars, Chars, int, int]
"""What a part is to llama.cpp's matcher: whether it can match nothing; its weight (how
many parses it may keep at once); the characters its matches begin with; those that may go
on with a match where one could also end; every character it holds; at how many places a
match of it may end (`[a-z]{1,1000}`: 1000, `[a-z]+`: 1, its parses coinciding); the most
characters a match holds (UNBOUNDED: no bound)."""

UNBOUNDED = 1 << 20


def _union(a: Chars, b: Chars) -> Chars:
    if a is b:
        return a
    a_all_but, a_chars = a
    b_all_but, b_chars = b
    if not (b_all_but or b_chars):  # most unions: the matcher's sets are few and small
        return a
    if not (a_all_but or a_chars):
        return b
    if a_all_but:
        return (True, a_chars & b_chars) if b_all_but else (True, a_chars - b_chars)
    return (True, b_chars - a_chars) if b_all_but else (False, a_chars | b_chars)


def _within(a: Chars, b: Chars) -> bool:
    """Every character of `a` is in `b`."""
    if a[0]:
        return b[0] and b[1] <= a[1]
    return a[1].isdisjoint(b[1]) if b[0] else a[1] <= b[1]


def _meets(a: Chars, b: Chars) -> bool:
    if a[0]:
        return True if b[0] else not b[1] <= a[1]
    return not a[1] <= b[1] if b[0] else not a[1].isdisjoint(b[1])


def join_sequence(parts: Iterable[Summary]) -> Summary:
    """A sequence's summary. A part that can match nothing, or that may begin where what
    came before could still go on, keeps as many more parses as it weighs (`a?b?`: 2):
    such parts in a row add up, any other part ends the run. A part that may begin where
    the last could end in many places, and can begin and go on with all the last holds,
    keeps a parse per place (`[a-z]{1,1000}[a-z]{1,1000}`: 39 ms a token in llama-server
    for 100 tokens where `[a-z]{2,2000}` took 22, and sixteen such in a row 327 ms, the
    more the longer the text; the count missed both)."""
    best, run, nullable = 0, 0, True
    first: Chars = NOTHING
    more: Chars = NOTHING
    every: Chars = NOTHING
    ends, span, last = 1, 0, NOTHING  # `last`: what the places it may end lie in
    for p_nullable, weight, p_first, p_more, p_every, p_ends, p_span in parts:
        open_start = _meets(more, p_first)
        if p_nullable or open_start:
            if open_start and ends > 1 and _within(last, p_first) and _within(last, p_more):
                # Counted as a copy of `(a|aa){0,n}` is, whose n weigh twice as many
                # places: `[a-z]{1,50}[a-z]{0,50}` took 27 ms a token, as `(a|aa){0,32}`.
                weight = max(weight, min(ends, p_span) // 2)
            run += max(1, weight)
            best = max(best, run)
        else:
            best, run = max(best, weight, run), 0
        if nullable:
            first = _union(first, p_first)
        joined = p_more
        if p_nullable:
            joined = _union(joined, _union(more, p_first))
        if open_start:
            # Where this part begins is open, so where it ends is: a later start may still
            # be reading it (`a{1,3}a` matches "aa" and "aaa"). What came before is not
            # carried on: `.*` then "example.com" is one way (a parse per way that the
            # text's end could be a prefix of the literal: "aaaa" after `.*` is four).
            joined = _union(joined, p_every)
        more = joined
        every = _union(every, p_every)
        nullable = nullable and p_nullable
        # Sums of the parts' (each at most UNBOUNDED): small; repeat_summary caps them.
        if p_nullable:
            ends += p_ends
            if last is not p_every:
                last = _union(last, p_every)
        else:
            ends, last = p_ends, p_every
        span += p_span
    return nullable, max(best, run), first, more, every, ends, span


def join_alternatives(branches: list[Summary]) -> Summary:
    """Alternatives' summary: the heaviest; two that begin alike may be prefixes of each
    other (`"a" | "aa"`), so a match of one may go on with anything either holds."""
    if len(branches) == 1:
        return branches[0]
    nullable, weight = False, 0
    first: Chars = NOTHING
    more: Chars = NOTHING
    every: Chars = NOTHING
    overlap = False
    ends, span = 0, 0
    for b_nullable, b_weight, b_first, b_more, b_every, b_ends, b_span in branches:
        ends += b_ends
        span = max(span, b_span)
        nullable = nullable or b_nullable
        weight = max(weight, b_weight)
        overlap = overlap or _meets(first, b_first)
        first = _union(first, b_first)
        more = _union(more, b_more)
        every = _union(every, b_every)
    if nullable:
        more = _union(more, first)  # an empty match, then another alternative's
    if overlap:
        more = _union(more, every)
    return nullable, weight, first, more, every, ends, span


def repeat_summary(part: Summary, low: int, high: int | None) -> Summary:
    """`part{low,high}` (high None: no maximum). A copy that can match nothing, or end where
    the next could begin, leaves the next copy to start at many places: llama.cpp writes a
    bounded repetition as that many nested rules and keeps a parse per copy that could be
    reading the text; an unbounded one is one recursive rule whose parses coincide, so it
    weighs its minimum and one more."""
    nullable, weight, first, more, every, ends, span = part
    if high == 0:
        return _EMPTY
    if nullable or _meets(more, first):
        copies = low + 1 if high is None else high
        weight = min(_MAX_WEIGHT, copies * max(1, weight))
    if high is None:
        span = UNBOUNDED  # one recursive rule: it ends in one place
    else:
        span = min(UNBOUNDED, high * span)
        if high > low or nullable or more != NOTHING:  # after any count it allows
            ends = min(UNBOUNDED, (high - (0 if nullable else low) + 1) * ends)
    if high is None or high > low or (high > 1 and (nullable or more != NOTHING)):
        # A copy ends, the next begins, and the repetition could have ended there. Not so
        # for a fixed count of copies that each end in one place: `([0-9a-f]{2}){32}`
        # ends only after its 64th character, and llama-server ran `(?:[0-9a-fA-F]{2}){1,4096}`
        # as fast as `[0-9a-fA-F]{2,2000}` (22 ms a token).
        more = _union(more, first)
    return nullable or low == 0, weight, first, more, every, ends, span


@lru_cache(maxsize=256)
def char_span(low: int, high: int) -> frozenset[str]:
    """A class range's characters (the same few recur: `a-z`, `0-9`)."""
    return frozenset(map(chr, range(low, high + 1)))


def add_span(chars: set[str] | None, bottom: str, top: str) -> set[str] | None:
    """A class's characters with the range `bottom`-`top` added; None (any character) once
    a range is too wide to list (WIDE_RANGE), or already."""
    if chars is None or ord(top) - ord(bottom) >= WIDE_RANGE:
        return None
    chars.update(char_span(ord(bottom), ord(top)))
    return chars


class _Unparsable(Exception):
    """llama.cpp would refuse this grammar itself (a 400): not ours to judge."""


class GrammarTooLarge(Exception):
    """Its repetitions would have llama.cpp write out more than MAX_EXPANDED_ELEMENTS."""

    def __init__(self, elements: int) -> None:
        super().__init__(elements)
        self.elements = elements


def runaway_left_recursion(grammar: str) -> str | None:
    """The rule whose left recursion would make llama.cpp's stack grow without end, or None
    (also None for a grammar llama.cpp cannot parse). GrammarTooLarge when its repetitions
    would have llama.cpp write out more than MAX_EXPANDED_ELEMENTS elements."""
    return analyse(grammar)[0]


@lru_cache(maxsize=64)
def analyse(grammar: str) -> tuple[str | None, int]:
    """The rule with runaway left recursion (or None), and how many parses llama.cpp may
    keep at once for the grammar's most ambiguous rule: (None, 0) for a grammar llama.cpp
    cannot parse. GrammarTooLarge as runaway_left_recursion. The answers for the last 64
    grammars are kept (at most 4 MB with grammar_guard's 64 KiB bound): a client sends
    the same grammar again and again, and reading one costs about 1 ms a KiB."""
    try:
        parsed = _Parser(grammar).parse()
        return parsed.runaway(), parsed.ambiguity()
    except _Unparsable:
        return None, 0


class _Grammar:
    def __init__(self) -> None:
        self.names: dict[str, int] = {}
        self.owner: list[str] = []  # the named rule each node was written in
        self.alternatives: list[list[_Alternative] | None] = []  # None: referenced, undefined
        # As written (repetitions not expanded), for rules and groups: the ambiguity count.
        self.shapes: list[list[list[_Piece]] | None] = []

    def node(self, owner: str) -> int:
        self.owner.append(owner)
        self.alternatives.append(None)
        self.shapes.append(None)
        return len(self.owner) - 1

    def ambiguity(self) -> int:
        """The most parses llama.cpp may keep at once in any rule (render/schema_limits.py
        counts a pattern's the same way). Character sets are a least fixed point over the
        references, nodes taken children first. A reference back into a rule not yet
        weighed in the pass (along a cycle) weighs 1, as a recursive rule's parses
        coincide, except inside a bounded repetition: llama.cpp writes that out as copies,
        each of which may be reading the rule, so it carries the rule's weight (from a
        pass where such references weighed 1, so that nothing compounds pass by pass)."""
        shapes = self.shapes
        order = self._children_first()
        nullable = _nullable([alts or [] for alts in self.alternatives])
        first: list[Chars] = [NOTHING] * len(shapes)
        more: list[Chars] = [NOTHING] * len(shapes)
        every: list[Chars] = [NOTHING] * len(shapes)
        weight = [0] * len(shapes)
        ends = [1] * len(shapes)
        span = [UNBOUNDED] * len(shapes)  # until weighed: a back reference's is unknown
        weighed = [False] * len(shapes)  # in this pass
        carried: list[int] | None = None  # what a back reference in a bounded repetition weighs
        copied_back = False  # such a reference was met

        def summary(piece: _Piece, bounded: bool) -> Summary:
            nonlocal copied_back
            kind = piece[0]
            if kind == 0:
                return False, 0, piece[1], NOTHING, piece[2], 1, 1
            if kind == 1:
                n = piece[1]
                if weighed[n]:
                    return nullable[n], weight[n], first[n], more[n], every[n], ends[n], span[n]
                if bounded:
                    copied_back = True
                w = 0 if carried is None or not bounded else carried[n]
                return nullable[n], w, first[n], more[n], every[n], 1, UNBOUNDED
            inner = summary(piece[1], bounded or piece[3] is not None)
            return repeat_summary(inner, piece[2], piece[3])

        def weigh() -> bool:
            """One pass, children first; whether any character set changed."""
            changed = False
            weighed[:] = [False] * len(shapes)
            for n in order:
                alts = shapes[n]
                assert alts is not None
                _, weight[n], f, m, e, ends[n], span[n] = join_alternatives(
                    [join_sequence([summary(p, False) for p in seq]) for seq in alts] or [_EMPTY]
                )
                weighed[n] = True
                if f != first[n] or m != more[n] or e != every[n]:
                    first[n], more[n], every[n], changed = f, m, e, True
            return changed

        for passes in range(_SET_PASSES + 1):
            if passes == _SET_PASSES:  # not settled: any character for what still grows
                first = [ANY] * len(shapes)
                more = [ANY] * len(shapes)
                every = [ANY] * len(shapes)
            if not weigh():
                break  # the weights of a pass that changed nothing are final
        if copied_back:
            carried = list(weight)
            weigh()
        return max(weight, default=0)

    def _children_first(self) -> list[int]:
        """Rules and groups, each after those it refers to (but along a cycle)."""
        shapes = self.shapes
        done = [False] * len(shapes)
        order: list[int] = []
        for start, alts in enumerate(shapes):
            if alts is None or done[start]:
                continue
            done[start] = True
            work: list[tuple[int, Iterator[int]]] = [(start, _references(alts))]
            while work:
                node, children = work[-1]
                for child in children:
                    if not done[child] and shapes[child] is not None:
                        done[child] = True
                        work.append((child, _references(shapes[child] or [])))
                        break
                else:
                    work.pop()
                    order.append(node)
        return order

    def named(self, name: str) -> int:
        found = self.names.get(name)
        if found is None:
            found = self.names[name] = self.node(name)
        return found

    def runaway(self) -> str | None:
        if any(alts is None for alts in self.alternatives):
            raise _Unparsable  # llama.cpp: "Undefined rule identifier"
        rules = [alts or [] for alts in self.alternatives]
        nullable = _nullable(rules)
        # edges[a]: (b, grows) for each b reachable at a's left past elements that match
        # nothing; grows when more elements follow b, left on the stack each turn.
        edges: list[list[tuple[int, bool]]] = [[] for _ in rules]
        for a, alts in enumerate(rules):
            for alt in alts:
                for i, element in enumerate(alt):
                    if element == TERMINAL:
                        break
                    edges[a].append((element, i < len(alt) - 1))
                    if not nullable[element]:
                        break
        component = _components(edges)
        for a, outgoing in enumerate(edges):
            for b, grows in outgoing:
                if grows and component[a] == component[b]:
                    return self.owner[a]
        return None


_SET_PASSES = 8
"""Passes over the grammar for its character sets: one, children first, settles all but
cycles, and these settle in a few more."""

_EMPTY: Summary = (True, 0, NOTHING, NOTHING, NOTHING, 1, 0)


def _references(alts: list[list[_Piece]]) -> Iterator[int]:
    for seq in alts:
        for piece in seq:
            while piece[0] == 2:
                piece = piece[1]
            if piece[0] == 1:
                yield piece[1]


def _nullable(rules: list[list[_Alternative]]) -> list[bool]:
    """Which nodes can match the empty string: a worklist over the alternatives, linear."""
    nullable = [False] * len(rules)
    pending: list[int] = []  # per alternative: elements not yet known to match nothing
    owner: list[int] = []
    users: list[list[int]] = [[] for _ in rules]  # node -> alternatives that name it
    ready: list[int] = []
    for node, alts in enumerate(rules):
        for alt in alts:
            index = len(pending)
            owner.append(node)
            pending.append(len(alt))
            for element in alt:
                if element != TERMINAL:
                    users[element].append(index)
            if not alt:
                ready.append(node)
    while ready:
        node = ready.pop()
        if nullable[node]:
            continue
        nullable[node] = True
        for index in users[node]:
            pending[index] -= 1  # one count per occurrence, as users lists each one
            if pending[index] == 0:
                ready.append(owner[index])
    return nullable


def _components(edges: list[list[tuple[int, bool]]]) -> list[int]:
    """Strongly connected components (Tarjan's algorithm, with an explicit stack)."""
    n = len(edges)
    index = [-1] * n
    low = [0] * n
    component = [-1] * n
    on_stack = [False] * n
    stack: list[int] = []
    counter = 0
    for start in range(n):
        if index[start] != -1:
            continue
        work: list[tuple[int, Iterator[tuple[int, bool]]]] = [(start, iter(edges[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack[start] = True
        while work:
            node, children = work[-1]
            for child, _ in children:
                if index[child] == -1:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack[child] = True
                    work.append((child, iter(edges[child])))
                    break
                if on_stack[child]:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    while True:
                        member = stack.pop()
                        on_stack[member] = False
                        component[member] = node
                        if member == node:
                            break
    return component


class _Parser:
    """llama.cpp's recursive descent, with an explicit stack of open groups."""

    def __init__(self, text: str) -> None:
        end = text.find("\0")  # llama.cpp reads the grammar as a C string
        self.text = text if end < 0 else text[:end]
        self.pos = 0
        self.grammar = _Grammar()
        self.width = 0  # llama.cpp's elements for the last symbol (what a quantifier copies)
        self.expanded = 0  # elements llama.cpp writes out for repetitions so far

    def parse(self) -> _Grammar:
        self.space(newlines=True)
        while self.pos < len(self.text):
            self.rule()
        return self.grammar

    def peek(self, ahead: int = 0) -> str:
        at = self.pos + ahead
        return self.text[at] if at < len(self.text) else ""

    def space(self, newlines: bool) -> None:
        text, n, i = self.text, len(self.text), self.pos
        while i < n and (text[i] in " \t#" or (newlines and text[i] in "\r\n")):
            if text[i] == "#":
                while i < n and text[i] not in "\r\n":
                    i += 1
            else:
                i += 1
        self.pos = i

    def name(self) -> str:
        start = self.pos
        while _is_word(self.peek()):
            self.pos += 1
        if self.pos == start:
            raise _Unparsable
        return self.text[start : self.pos]

    def rule(self) -> None:
        name = self.name()
        self.space(newlines=False)
        if not self.text.startswith("::=", self.pos):
            raise _Unparsable
        self.pos += 3
        self.space(newlines=True)
        node = self.grammar.named(name)
        self.grammar.alternatives[node], self.grammar.shapes[node] = self.alternates(name)
        c = self.peek()
        if c == "\r":
            self.pos += 2 if self.peek(1) == "\n" else 1
        elif c == "\n":
            self.pos += 1
        elif c:
            raise _Unparsable
        self.space(newlines=True)

    def alternates(self, name: str) -> tuple[list[_Alternative], list[list[_Piece]]]:
        """A rule's alternatives, compiled and as written; its groups open and close on an
        explicit stack."""
        levels: list[
            tuple[list[_Alternative], _Alternative, list[_Alternative], list[list[_Piece]]]
        ] = []
        alts: list[_Alternative] = []
        seq: _Alternative = []
        last: list[_Alternative] = []  # the last symbol's elements, for a quantifier
        shapes: list[list[_Piece]] = [[]]  # the alternatives as written, the last open
        while True:
            if self.sequence(name, seq, last, shapes[-1], nested=bool(levels)):
                levels.append((alts, seq, last, shapes))  # a group opened
                alts, seq, last, shapes = [], [], [], [[]]
                continue
            alts.append(seq)
            if self.peek() == "|":
                self.pos += 1
                self.space(newlines=True)
                seq, last = [], []
                shapes.append([])
                continue
            if not levels:
                return alts, shapes
            if self.peek() != ")":
                raise _Unparsable
            self.pos += 1
            group = self.grammar.node(name)
            self.grammar.alternatives[group] = alts
            self.grammar.shapes[group] = shapes
            alts, seq, last, shapes = levels.pop()
            seq.append(group)
            last[:] = [[group]]
            shapes[-1].append((1, group))
            self.width = 1  # a rule reference
            self.space(newlines=bool(levels))

    def sequence(
        self,
        name: str,
        seq: _Alternative,
        last: list[_Alternative],
        shape: list[_Piece],
        nested: bool,
    ) -> bool:
        """Reads elements into `seq` (and as written into `shape`) until the sequence ends;
        True when a group opens."""
        text = self.text
        while self.pos < len(text):
            c = text[self.pos]
            piece: _Piece | None
            if c == '"':
                self.pos += 1
                literal: set[str] = set()
                lead = ""
                width = 0
                while self.peek() != '"':
                    if not self.peek():
                        raise _Unparsable
                    one = self.char()
                    lead = lead or one
                    literal.add(one)
                    width += 1  # a character element each
                self.pos += 1
                symbol: _Alternative = [TERMINAL] if width else []
                piece = (
                    (0, (False, frozenset(lead)), (False, frozenset(literal))) if width else None
                )
            elif c == "[":
                self.pos += 1
                chars: set[str] | None = set()
                negated = self.peek() == "^"
                if negated:
                    self.pos += 1
                width = 0
                while self.peek() != "]":
                    if not self.peek():
                        raise _Unparsable
                    bottom = self.char()
                    width += 1
                    if self.peek() == "-" and self.peek(1) != "]":
                        if not self.peek(1):
                            raise _Unparsable
                        self.pos += 1
                        top = self.char()
                        width += 1  # a range's upper bound is an element of its own
                        chars = add_span(chars, bottom, top)
                    elif chars is not None:
                        chars.add(bottom)
                self.pos += 1
                symbol = [TERMINAL] if width else []
                found = ANY if chars is None else (negated, frozenset(chars))
                piece = (0, found, found) if width else None
            elif c == "<" or c == "!":
                start = self.pos
                self.token()
                symbol, width = [TERMINAL], 1
                # A token is matched whole: it meets only itself, `!<t>` any other.
                token: Chars = (c == "!", frozenset((self.text[start + (c == "!") : self.pos],)))
                piece = (0, token, token)
            elif _is_word(c):
                symbol, width = [self.grammar.named(self.name())], 1
                piece = (1, symbol[0])
            elif c == "(":
                self.pos += 1
                self.space(newlines=True)
                return True
            elif c == ".":
                self.pos += 1
                symbol, width = [TERMINAL], 1
                piece = (0, ANY, ANY)
            elif c in "*+?{":
                self.pos += 1
                self.space(nested)
                low, high = (0, None) if c == "*" else (1, None) if c == "+" else (0, 1)
                if c == "{":
                    low, high = self.bounds(nested)
                    if high is not None and low > high:
                        raise _Unparsable  # grammar_guard's inverted repetition
                self.repeat(name, seq, last, low, high)
                shape[-1] = (2, shape[-1], low, high)
                continue
            else:
                return False
            self.space(nested)
            if piece is not None:
                shape.append(piece)
            seq.extend(symbol)
            last[:] = [symbol]
            self.width = width
        return False

    def repeat(
        self,
        name: str,
        seq: _Alternative,
        last: list[_Alternative],
        low: int,
        high: int | None,
    ) -> None:
        """llama.cpp's rewrite: S{m,n} is S m times, then S'(n-m) with S'(k) ::= S S'(k-1) |.
        Two copies of S reach what m copies reach, with the same growth; every S'(k) with
        k >= 2 behaves as the unbounded S' ::= S S' |, and S'(1) ::= S | ends there."""
        if not last or not last[0]:
            raise _Unparsable  # "expecting preceding item to */+/?/{"
        # What llama.cpp writes out: S low times inline, then one rule per optional count
        # holding S, a reference and two markers; the result is what a next quantifier copies.
        optional_rules = 1 if high is None else high - low
        width = self.width
        self.expanded += width * (low + optional_rules) + 3 * optional_rules
        if self.expanded > MAX_EXPANDED_ELEMENTS:
            raise GrammarTooLarge(self.expanded)
        self.width = width * low + (1 if optional_rules else 0)
        symbol = last[0]
        del seq[len(seq) - len(symbol) :]
        if len(symbol) > 1:  # keep S one element: a node of its own reaches the same
            wrapped = self.grammar.node(name)
            self.grammar.alternatives[wrapped] = [list(symbol)]
            symbol = [wrapped]
        element = symbol[0]
        compiled: _Alternative = [element] * min(low, 2)
        optional = None if high is None else high - low
        if optional is None or optional > 0:
            tail = self.grammar.node(name)
            more = [element, tail] if optional is None or optional > 1 else [element]
            self.grammar.alternatives[tail] = [more, []]
            compiled.append(tail)
        seq.extend(compiled)
        last[:] = [compiled]

    def bounds(self, nested: bool) -> tuple[int, int | None]:
        low = self.integer()
        self.space(nested)
        high: int | None
        if self.peek() == "}":
            high = low
        elif self.peek() == ",":
            self.pos += 1
            self.space(nested)
            high = self.integer() if self.peek().isdigit() and self.peek().isascii() else None
            self.space(nested)
            if self.peek() != "}":
                raise _Unparsable
        else:
            raise _Unparsable
        self.pos += 1
        self.space(nested)
        if low > _MAX_REPETITION:
            raise _Unparsable
        if high is not None and high > _MAX_REPETITION:
            high = None
        return low, high

    def integer(self) -> int:
        start = self.pos
        while "0" <= self.peek() <= "9" and self.peek():
            self.pos += 1
        digits = self.text[start : self.pos].lstrip("0")
        if self.pos == start or len(digits) > 20 or (digits and int(digits) >= 2**64):
            raise _Unparsable  # std::stoull: out of range
        return int(digits) if digits else 0

    def char(self) -> str:
        """The character at `pos` (an escape's value), moving past it."""
        if self.peek() != "\\":
            self.pos += 1
            return self.text[self.pos - 1]
        kind = self.peek(1)
        if kind in _HEX:
            size = _HEX[kind]
            digits = self.text[self.pos + 2 : self.pos + 2 + size]
            if len(digits) != size or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise _Unparsable
            self.pos += 2 + size
            return chr(min(int(digits, 16), 0x10FFFF))
        if kind and kind in _ESCAPES:
            self.pos += 2
            return _ESCAPED.get(kind, kind)
        raise _Unparsable

    def token(self) -> None:
        if self.peek() == "!":
            self.pos += 1
        if self.peek() != "<":
            raise _Unparsable
        end = self.text.find(">", self.pos)
        if end < 0:
            raise _Unparsable
        self.pos = end + 1


def _is_word(c: str) -> bool:
    return c != "" and (("a" <= c <= "z") or ("A" <= c <= "Z") or ("0" <= c <= "9") or c == "-")
