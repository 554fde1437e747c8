"""Prefix hashing and the bounded affinity maps."""

from __future__ import annotations

from llamacpp_proxy.route.affinity import (
    BLOCK_BYTES,
    MAX_BLOCKS,
    MAX_SESSION_KEY,
    PrefixMap,
    SessionMap,
    prefix_hashes,
)


def test_block_hashes_are_chained_over_the_whole_prefix() -> None:
    a = prefix_hashes("x" * BLOCK_BYTES + "y" * BLOCK_BYTES)
    b = prefix_hashes("z" * BLOCK_BYTES + "y" * BLOCK_BYTES)
    assert len(a) == 2
    # Same second block, different first: the second hashes differ (they cover the prefix).
    assert a[1] != b[1]
    assert prefix_hashes("x" * BLOCK_BYTES + "y" * BLOCK_BYTES + "tail")[:2] == a


def test_only_full_blocks_count_and_the_count_is_capped() -> None:
    assert prefix_hashes("x" * (BLOCK_BYTES - 1)) == []
    assert len(prefix_hashes("x" * (BLOCK_BYTES * (MAX_BLOCKS + 5)))) == MAX_BLOCKS
    assert prefix_hashes("é" * BLOCK_BYTES) == prefix_hashes("é".encode() * BLOCK_BYTES)


def test_longest_match_wins_and_knows_a_continuation_from_a_shared_prefix() -> None:
    m = PrefixMap()
    system = "s" * (2 * BLOCK_BYTES)
    turn1 = system + "u" * BLOCK_BYTES
    m.record(prefix_hashes(system), "short", system.encode())
    m.record(prefix_hashes(turn1), "long", turn1.encode())
    turn2 = turn1 + "r" * BLOCK_BYTES
    match = m.longest(prefix_hashes(turn2), None, turn2.encode())
    assert match is not None
    assert match.server == "long" and match.matched_bytes == 3 * BLOCK_BYTES
    assert match.continuation
    other = m.longest(prefix_hashes(system + "v" * BLOCK_BYTES))
    assert other is not None and other.server == "long"
    assert other.matched_bytes == 2 * BLOCK_BYTES and not other.continuation
    assert m.longest(prefix_hashes("q" * BLOCK_BYTES)) is None


def test_matches_on_unusable_servers_are_passed_over_for_shorter_ones() -> None:
    m = PrefixMap()
    m.record(prefix_hashes("a" * 2 * BLOCK_BYTES), "two")
    m.record(prefix_hashes("a" * BLOCK_BYTES), "one")
    match = m.longest(prefix_hashes("a" * 3 * BLOCK_BYTES), frozenset({"one"}))
    assert match is not None and match.server == "one"


def test_prefix_memory_is_bounded_least_recently_used_first() -> None:
    m = PrefixMap(max_entries=4)
    old = prefix_hashes("o" * 2 * BLOCK_BYTES)
    m.record(old, "s1")
    m.record(prefix_hashes("n" * 3 * BLOCK_BYTES), "s2")
    assert len(m) == 4
    assert m.longest(old[:1]) is None  # the oldest entry went first
    assert m.longest(old) is not None


def test_forgetting_a_server_drops_its_entries() -> None:
    m = PrefixMap()
    m.record(prefix_hashes("a" * BLOCK_BYTES), "one")
    m.record(prefix_hashes("b" * BLOCK_BYTES), "two")
    m.forget_server("one")
    assert len(m) == 1 and m.longest(prefix_hashes("a" * BLOCK_BYTES)) is None


def test_sessions_are_bounded_and_long_keys_cut() -> None:
    s = SessionMap(max_entries=2)
    s.record("a", "one")
    s.record("b", "two")
    s.get("a")  # a lookup is not a use: recording is
    s.record("c", "three")
    assert s.get("a") is None and s.get("b") == "two" and len(s) == 2
    long = "k" * (MAX_SESSION_KEY * 10)
    s.record(long, "one")
    assert s.get(long[:MAX_SESSION_KEY]) == "one"
    s.forget_server("one")
    assert s.get(long) is None


def test_a_continuation_goes_on_with_the_whole_earlier_prompt_not_just_its_blocks() -> None:
    m = PrefixMap()
    earlier = ("s" * (2 * BLOCK_BYTES) + "question one").encode()
    m.record(prefix_hashes(earlier), "one", earlier)
    for prompt, continues in [
        (earlier, True),  # the same prompt again
        (earlier + b" and the answer", True),  # the next turn
        (earlier + b"x" * (2 * BLOCK_BYTES), True),  # a longer next turn
        (b"s" * (2 * BLOCK_BYTES) + b"question two", False),  # same blocks, other tail
        (b"s" * (2 * BLOCK_BYTES) + b"ques", False),  # shorter than the earlier tail
    ]:
        match = m.longest(prefix_hashes(prompt), None, prompt)
        assert match is not None and match.server == "one"
        assert match.continuation is continues, prompt[2 * BLOCK_BYTES :]
