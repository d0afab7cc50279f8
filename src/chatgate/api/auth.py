"""API-key checks: Bearer tokens compared in constant time."""

from __future__ import annotations

import hmac

from chatgate.errors import AuthenticationError


class KeyChecker:
    """Accepts a request when its Bearer token is one of the configured keys (or none are)."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

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
