"""Admission control: rate limits and quotas per key, user and org, and fair GPU-pool slots.

    limits.py        Limits values and role defaults
    scopes.py        which scopes (key, user, org) a caller is charged to
    store.py         LimitStore interface, Decision, make_store(url)
    memory_store.py  in-process backend (one replica)
    redis_store.py   Redis backend (replicas share one set of limits); the only module importing redis
    pool_gate.py     per-replica, per-pool fair queue with per-key caps, drain and isolate
    admission.py     Admitter: store reservation + pool slot for one request, released exactly once
    errors.py        RateLimited (429), LimiterUnavailable (503), PoolBusy (429/503)
    overrides.py     a scope's configured limits, read and set (audited) for the admin API and the CLI
    cli.py           `python -m server limits show|set`

Nothing is imported here eagerly, so importing the package never pulls in redis.
"""
