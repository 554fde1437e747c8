"""Conversation affinity: which server already holds (in llama.cpp's slot cache) the longest
prefix of this prompt, found from the prompts routed before. Memory is bounded (LRU).

The prompt is cut into fixed-size blocks of its UTF-8 bytes and hashed as a chain: block i's
hash covers the whole prefix up to the end of block i, so one dict lookup asks "which server
last saw this exact prefix?". The longest recorded prefix wins (a backward scan from the
last block stops at the first hit).

Each entry also remembers whether its block was the LAST full block of the prompt recorded
there, and then the hash of that prompt's tail (the bytes after its last full block). A
match on such a block whose bytes go on with that same tail means this prompt starts with
the whole of that one (the next turn of the same conversation, or the same prompt again): a
*continuation*, worth waiting a little for. Anything else only means a shared beginning
(the same system prompt in another conversation): a *shared prefix*, used only to break
ties, so distinct conversations that share a system prompt still spread over the pool. The
tail matters: two first turns with one long system prompt and short, different questions
have the same full blocks, and without it every new conversation looked like the last
one's next turn and queued for its server while others stood idle.

Hashes are Python's own `hash()` (SipHash, randomised per process): the fastest chain we
measured (about 5 us for a 4 KB prompt on the 2-core dev machine; scripts/bench-route) and
not predictable by a client. They mean nothing in another process, so a map shared through
Redis would need a stable chain (zlib.crc32 and adler32 chained measured about 2x slower).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

BLOCK_BYTES = 256
"""Prefix granularity: about 64 tokens; a match is rounded down to whole blocks."""
MAX_BLOCKS = 1024
"""Blocks hashed per prompt (256 KiB): bounds per-request CPU; longer prompts that share
their first 256 KiB count as one conversation, which for routing they are."""
DEFAULT_MAX_PREFIXES = 100_000
"""Block entries kept (about 200 bytes each, measured: 20 MB at most; a 32 KB conversation
uses 128 entries)."""
DEFAULT_MAX_SESSIONS = 10_000
"""Explicit session keys kept."""
MAX_SESSION_KEY = 256
"""Longer session keys are cut (they come from clients)."""


def prompt_bytes(prompt: str | bytes) -> bytes:
    """The bytes prefixes are taken of (a rendered prompt's UTF-8)."""
    return prompt.encode("utf-8", "surrogatepass") if isinstance(prompt, str) else prompt


def prefix_hashes(prompt: str | bytes) -> list[int]:
    """Chained hashes of the prompt's full blocks: entry i covers bytes [0, (i+1)*BLOCK)."""
    data = prompt_bytes(prompt)
    end = min(len(data) // BLOCK_BYTES, MAX_BLOCKS) * BLOCK_BYTES
    out: list[int] = []
    append = out.append
    h = 0
    for i in range(0, end, BLOCK_BYTES):
        h = hash((h, data[i : i + BLOCK_BYTES]))
        append(h)
    return out


@dataclass(frozen=True)
class Match:
    """Where the longest recorded prefix of a prompt was served."""

    server: str
    """Server key."""
    matched_bytes: int
    continuation: bool
    """True when the prompt extends the whole of the earlier prompt (same conversation)."""


def _tail(chain: int, blocks: int, data: bytes, length: int) -> int | None:
    """The hash of the `length` bytes of `data` after its first `blocks` full blocks (whose
    chained hash is `chain`); None when `data` is shorter."""
    end = blocks * BLOCK_BYTES
    if len(data) < end + length:
        return None
    return hash((chain, data[end : end + length]))


class PrefixMap:
    """Prefix-block hash -> (server key, tail length, tail hash), bounded LRU. Inner blocks
    have tail length -1; the last full block of a recorded prompt has its tail's (the bytes
    after it, fewer than BLOCK_BYTES) length and hash."""

    def __init__(self, max_entries: int = DEFAULT_MAX_PREFIXES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._map: OrderedDict[int, tuple[str, int, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def longest(
        self, hashes: list[int], usable: frozenset[str] | None = None, data: bytes = b""
    ) -> Match | None:
        """The longest recorded prefix, optionally only among servers in `usable` (a server
        since removed from the pool is passed over for a shorter match elsewhere). `data`,
        the prompt's bytes (`prompt_bytes`), tells a continuation from a shared prefix: a
        recorded prompt with a tail is continued only by bytes that go on with that tail."""
        get = self._map.get
        for i in range(len(hashes) - 1, -1, -1):
            entry = get(hashes[i])
            if entry is not None and (usable is None or entry[0] in usable):
                server, tail_length, tail_hash = entry
                continuation = (
                    tail_length >= 0 and _tail(hashes[i], i + 1, data, tail_length) == tail_hash
                )
                return Match(server, (i + 1) * BLOCK_BYTES, continuation)
        return None

    def record(self, hashes: list[int], server: str, data: bytes = b"") -> None:
        """Remember that `server` now holds this prompt (every prefix of it); `data` is the
        prompt's bytes (`prompt_bytes`), whose tail a continuation must go on with."""
        if not hashes:
            return
        m = self._map
        inner = (server, -1, 0)
        for h in hashes:
            m[h] = inner
            m.move_to_end(h)
        blocks = len(hashes)
        # A prompt cut at MAX_BLOCKS has no tail: what follows its first 256 KiB is not read.
        length = 0 if blocks >= MAX_BLOCKS else max(0, len(data) - blocks * BLOCK_BYTES)
        tail = _tail(hashes[-1], blocks, data, length)
        m[hashes[-1]] = (server, length, tail if tail is not None else 0)
        while len(m) > self.max_entries:
            m.popitem(last=False)

    def forget_server(self, server: str) -> None:
        """Drop every entry of a server (it restarted: its cache is gone). O(entries)."""
        for h in [h for h, entry in self._map.items() if entry[0] == server]:
            del self._map[h]


class SessionMap:
    """Explicit session key (X-Session-Id, `user`, `prompt_cache_key`) -> server, bounded LRU."""

    def __init__(self, max_entries: int = DEFAULT_MAX_SESSIONS) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._map: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def get(self, key: str) -> str | None:
        """The server this session last used, if remembered."""
        return self._map.get(key[:MAX_SESSION_KEY])

    def record(self, key: str, server: str) -> None:
        """Remember the session's server (most recent use)."""
        k = key[:MAX_SESSION_KEY]
        self._map[k] = server
        self._map.move_to_end(k)
        if len(self._map) > self.max_entries:
            self._map.popitem(last=False)

    def forget_server(self, server: str) -> None:
        """Drop every session of a server."""
        for k in [k for k, s in self._map.items() if s == server]:
            del self._map[k]
