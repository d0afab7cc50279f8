"""Who is calling: the request's one API key, parsed once, before any body is read.

`IdentityMiddleware` is plain ASGI and looks only at the request line and headers. It reads
every header that can carry a key (`Authorization: Bearer …`, Azure's `api-key`, Anthropic's
`x-api-key`); more than one of them is a 400, so no later step can read a different key than
the one checked. An accepted request runs with a `Caller` in the `caller` context variable, and
every step that cares who is calling reads that one object: the key check itself, the per-key
limits (`limits.middleware`), the models a key may use (`limits.scoped`), the cache salt a
worker keeps its cached prompt prefixes under (`cache_salt`), and the logs (its `label`, never
the key).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from chatgate import tracing
from chatgate.api import access
from chatgate.api.errors import error_response
from chatgate.api.limits.policy import KeyPolicy
from chatgate.errors import AuthenticationError, InvalidRequestError

# Headers a client may put its key in; a request may use exactly one of them, once.
KEY_HEADERS = (b"authorization", b"api-key", b"x-api-key")


@dataclass(frozen=True)
class Caller:
    """The accepted key of a request: names for it that do not reveal it, and its policy."""

    digest: str  # `key_digest`: names the caller to workers (the cache salt)
    store_key: str  # what the rate limiter counts under (another digest, domain-separated)
    policy: KeyPolicy | None  # per-key limits and models, when the keys file gives any
    admin: bool = False  # an `--admin-keys` key

    @property
    def label(self) -> str:
        """How messages name the caller (never the key itself)."""
        return self.policy.label() if self.policy is not None else "this API key"

    @property
    def log_name(self) -> str:
        """How the access log names the caller: its name in the keys file, else a short digest
        (enough to tell keys apart in logs, nothing to recover a key from)."""
        name = self.policy.name if self.policy is not None else None
        return name or f"sha256:{self.digest[:12]}"


# The caller of the request being served (None when no keys are checked).
caller: ContextVar[Caller | None] = ContextVar("chatgate_caller", default=None)


def key_digest(key: bytes) -> str:
    """A name for an API key that does not reveal it.

    Deterministic (SHA-256, no per-process secret): several API servers may front one worker
    fleet, and a tenant's requests must land in the same cache whichever of them it reaches.
    Domain-separated from the rate limiter's digest (`store_key`), so the two cannot be matched
    against each other."""
    return hashlib.sha256(b"chatgate cache salt\0" + key).hexdigest()


def store_key(key: bytes) -> str:
    """The name per-key counters are kept under: a digest, so a key never sits in Redis or in
    memory dumps."""
    return hashlib.sha256(key).hexdigest()[:32]


def cache_salt(requested: str | None) -> str | None:
    """The salt a generation's cached prompt prefixes are kept under: one digest of the caller's
    key (when keys are checked) and the request's own `cache_salt`, or None (the shared cache)
    when there is neither. Only the digest travels to workers, so neither the key nor the
    client's salt appears in a worker's requests or logs."""
    who = caller.get()
    key = who.digest if who is not None else None
    if key is None and requested is None:
        return None
    return hashlib.sha256(json.dumps([key, requested]).encode()).hexdigest()


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The one key a request presents, or None; a 400 if it presents more than one.

    `Authorization` must use the Bearer scheme; a key header that is present but empty counts
    as presented (and is refused as no key)."""
    found = [(name, value) for name, value in headers if name.lower() in KEY_HEADERS]
    if len(found) > 1:
        names = sorted({name.decode("latin-1").lower() for name, _ in found})
        raise InvalidRequestError(
            f"The request carries {len(found)} API key headers ({', '.join(names)}); send your key "
            "in exactly one (Authorization: Bearer YOUR_KEY).",
            code="duplicate_api_key",
        )
    if not found:
        return None
    name, value = found[0]
    text = value.decode("latin-1").strip()
    if name.lower() == b"authorization":
        scheme, _, token = text.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""
    return text


class KeyChecker:
    """The configured keys, each with its policy; accepts a request whose one key is among
    them (or any request when none are configured)."""

    def __init__(self, keys: Sequence[str], policies: Mapping[str, KeyPolicy], *, admin: Sequence[str] = ()) -> None:
        every = [k for k in dict.fromkeys([*keys, *policies, *admin]) if k]
        # Each key's callers, made once: the digests name it on every request.
        self._keys = [
            (k.encode(), Caller(key_digest(k.encode()), store_key(k.encode()), policies.get(k), admin=k in admin))
            for k in every
        ]

    @property
    def required(self) -> bool:
        """Whether any key is configured."""
        return bool(self._keys)

    def check(self, key: str | None) -> Caller | None:
        """The caller of an accepted key (None when no keys are configured); raises
        `AuthenticationError` unless `key` is one."""
        if not self._keys:
            return None
        if not key:
            raise AuthenticationError(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        given = key.encode("latin-1")
        # Compare against every key so the time taken does not depend on which one matched.
        matched: Caller | None = None
        for known, who in self._keys:
            if hmac.compare_digest(given, known):
                matched = who
        if matched is None:
            raise AuthenticationError("Incorrect API key provided.")
        return matched


def _is_preflight(scope: Scope, headers: list[tuple[bytes, bytes]]) -> bool:
    # Browsers send CORS preflights without credentials; the CORS layer answers them.
    return scope["method"] == "OPTIONS" and any(n == b"access-control-request-method" for n, _ in headers)


# Paths a caller may reach with no key at all (a key it does give is still checked): readiness,
# which orchestrators probe without credentials and which then answers its status only.
PROBE_PATHS = frozenset({"/ready"})


class IdentityMiddleware:
    """Parses the caller once; refuses, from the headers alone, a request with no accepted key
    (401) or with more than one key header (400). Paths for which `public` is true (liveness
    probes, the playground's static page) need no key; on `PROBE_PATHS` a request without a key
    runs with no caller."""

    def __init__(self, app: ASGIApp, *, keys: KeyChecker, public: Callable[[str], bool]) -> None:
        self.app = app
        self.keys = keys
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.public(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers") or [])
        if _is_preflight(scope, headers):
            await self.app(scope, receive, send)
            return
        try:
            key = presented_key(headers)
            with tracing.span("chatgate.auth"):
                who = None if key is None and scope["path"] in PROBE_PATHS else self.keys.check(key)
        except (AuthenticationError, InvalidRequestError) as exc:
            # Answered without receiving the body; the server then closes the connection.
            await error_response(exc, scope=scope)(scope, receive, send)
            return
        scope.setdefault("state", {})["caller"] = who
        entry = access.record()
        if entry is not None and who is not None:
            entry.key = who.log_name
        token = caller.set(who)
        try:
            await self.app(scope, receive, send)
        finally:
            caller.reset(token)
