"""The guard: who a key belongs to, and the limits that admit or refuse its requests."""
