"""API-key checks: Bearer tokens compared in constant time, before any body is read; and the
cache salt that keeps one key's cached prompts from another's.

`KeyMiddleware` is plain ASGI and looks only at the request line and headers, so a request
without an accepted key is answered 401 before a byte of its body is received or parsed. An
accepted request runs with a digest of its key in `caller`, from which `cache_salt` derives the
salt a worker keeps its cached prompt prefixes under: a request's time to first token then says
nothing about what callers with other keys sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from contextvars import ContextVar

from starlette.types import ASGIApp, Receive, Scope, Send

from chatgate.api.errors import error_response
from chatgate.errors import AuthenticationError


class KeyChecker:
    """Accepts a request when its Bearer token is one of the configured keys (or none are)."""

    def __init__(self, keys: list[str]) -> None:
        # Each key with its digest, taken once: the digest names the caller on every request.
        self._keys = [(k.encode(), key_digest(k.encode())) for k in keys if k]

    @property
    def required(self) -> bool:
        """Whether any key is configured."""
        return bool(self._keys)

    def check(self, authorization: str | None) -> str | None:
        """The digest (`key_digest`) of the accepted key the header carries (None when no keys
        are configured); raises `AuthenticationError` unless it carries one."""
        if not self._keys:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        given = token.strip().encode()
        # Compare against every key so the time taken does not depend on which one matched.
        matched: str | None = None
        for key, digest in self._keys:
            if hmac.compare_digest(given, key):
                matched = digest
        if matched is None:
            raise AuthenticationError("Incorrect API key provided.")
        return matched


# A digest of the current request's API key, while it is served (None when no keys are checked).
caller: ContextVar[str | None] = ContextVar("chatgate_caller", default=None)


def key_digest(key: bytes) -> str:
    """A name for an API key that does not reveal it.

    Deterministic (SHA-256, no per-process secret): several API servers may front one worker
    fleet, and a tenant's requests must land in the same cache whichever of them it reaches.
    Domain-separated from the rate limiter's digest (`limits.middleware.store_key`), so the two
    cannot be matched against each other."""
    return hashlib.sha256(b"chatgate cache salt\0" + key).hexdigest()


def cache_salt(requested: str | None) -> str | None:
    """The salt a generation's cached prompt prefixes are kept under: one digest of the caller's
    key (when keys are checked) and the request's own `cache_salt`, or None (the shared cache)
    when there is neither. Only the digest travels to workers, so neither the key nor the
    client's salt appears in a worker's requests or logs."""
    key = caller.get()
    if key is None and requested is None:
        return None
    return hashlib.sha256(json.dumps([key, requested]).encode()).hexdigest()


def _is_preflight(scope: Scope, headers: dict[bytes, bytes]) -> bool:
    # Browsers send CORS preflights without credentials; the CORS layer answers them.
    return scope["method"] == "OPTIONS" and b"access-control-request-method" in headers


class KeyMiddleware:
    """Refuses HTTP requests without an accepted key, from the headers alone; paths for
    which `public` is true (liveness probes, the playground's static page) need none."""

    def __init__(self, app: ASGIApp, *, keys: KeyChecker, public: Callable[[str], bool]) -> None:
        self.app = app
        self.keys = keys
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.required or self.public(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if _is_preflight(scope, headers):
            await self.app(scope, receive, send)
            return
        try:
            digest = self.keys.check(headers.get(b"authorization", b"").decode("latin-1"))
        except AuthenticationError as exc:
            # Answered without receiving the body; the server then closes the connection.
            await error_response(exc)(scope, receive, send)
            return
        token = caller.set(digest)
        try:
            await self.app(scope, receive, send)
        finally:
            caller.reset(token)
