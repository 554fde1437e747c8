"""The route stage: which pool of llama.cpp servers serves a model, and which server of the
pool serves a request (health, free slots, conversation affinity), with failover rules.

Everything here is pure or asyncio-only (no sockets); the clock is injected, so the whole
stage is tested without servers and without sleeps. See docs/routing.md.

    pools.py     the --upstreams-file / --llamacpp-server flags -> an immutable Routing
    router.py    one pool's choice of server: capacity, affinity, the wait queue, leases
    affinity.py  longest-shared-prefix and session-key maps, bounded LRU
    waitqueue.py the queue discipline (fair between keys: weighted start-time fair queueing)
    health.py    per-server ready/loading/down state machine, probe backoff, /health/ready
    probe.py     what llama.cpp's /health, /props and /slots answers mean
    failover.py  which failures may be retried on another server
    clock.py     the injected clock (now + timers)
"""
