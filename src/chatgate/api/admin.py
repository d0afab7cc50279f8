"""Who may see the whole server: `/metrics` (every model, worker and key's traffic) and the
workers of every model on `/ready`.

With no API keys configured the server is open and everyone may. Otherwise only callers with
one of `--admin-keys` may: `/metrics` is 403 for any other key (Prometheus scrapes with an admin
key), and `/ready` shows another key only the models it may use. The caller is read in one place
(`is_admin`), from the caller the key check leaves (`auth.Caller.admin`).
"""

from __future__ import annotations

from chatgate.api import auth
from chatgate.errors import PermissionDeniedError


class AdminKeys:
    """Whether any key is checked at all; the admin keys themselves are `KeyChecker`'s."""

    def __init__(self, *, keys_checked: bool) -> None:
        self._open = not keys_checked

    def is_anonymous(self) -> bool:
        """Whether keys are checked and the current request gave none (a readiness probe)."""
        return not self._open and auth.caller.get() is None

    def is_admin(self) -> bool:
        """Whether the current request's caller may see everything."""
        who = auth.caller.get()
        return self._open or (who is not None and who.admin)

    def require(self) -> None:
        """A route dependency: 403 unless the caller is an admin."""
        if not self.is_admin():
            raise PermissionDeniedError(
                "This endpoint needs an admin key (--admin-keys).", code="admin_key_required"
            )
