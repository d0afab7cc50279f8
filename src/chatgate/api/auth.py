"""API-key checks: Bearer tokens compared in constant time, before any body is read.

`KeyMiddleware` is plain ASGI and looks only at the request line and headers, so a request
without an accepted key is answered 401 before a byte of its body is received or parsed.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from chatgate.api.errors import error_response
from chatgate.errors import AuthenticationError


class KeyChecker:
    """Accepts a request when its Bearer token is one of the configured keys (or none are)."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def required(self) -> bool:
        """Whether any key is configured."""
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Raise `AuthenticationError` unless the header carries an accepted key."""
        if not self._keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        given = token.strip().encode()
        # Compare against every key so the time taken does not depend on which one matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise AuthenticationError("Incorrect API key provided.")


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
            self.keys.check(headers.get(b"authorization", b"").decode("latin-1"))
        except AuthenticationError as exc:
            # Answered without receiving the body; the server then closes the connection.
            await error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)
