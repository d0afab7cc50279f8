"""Per-key limits: a keys file of policies, counters in memory or in Redis, an ASGI layer that
admits or refuses each request with OpenAI's `x-ratelimit-*` headers, and a pool wrapper that
hides the models a key may not use.

    policy.py      KeyPolicy, and the keys file (YAML or JSON) that maps keys to policies
    store.py       LimitStore: admit / charge / release; Usage; the in-memory store
    redis_store.py the same over Redis (atomic Lua scripts, shared by API replicas)
    grant.py       the request's grant (a context variable): charging tokens, allowed models
    middleware.py  RateLimitMiddleware: 429s and headers
"""
