"""The limited key of the request being served, in a context variable: serving code charges
the tokens it used and the worker pool checks the models the key may use, without either
knowing about keys. Unlimited requests have no grant, and both calls do nothing."""

from __future__ import annotations

import logging
from contextvars import ContextVar
from dataclasses import dataclass

from chatgate.api.limits.policy import KeyPolicy
from chatgate.api.limits.store import LimitStore
from chatgate.errors import PermissionDeniedError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grant:
    """An admitted request of a key that has a policy."""

    key: str  # the store's name for the key (a digest, never the key itself)
    policy: KeyPolicy
    store: LimitStore


current: ContextVar[Grant | None] = ContextVar("chatgate_grant", default=None)


async def charge(tokens: int) -> None:
    """Count `tokens` against the current key's tokens-per-minute (if it has that limit)."""
    grant = current.get()
    if grant is None or grant.policy.tpm is None or tokens <= 0:
        return
    try:
        await grant.store.charge(grant.key, tokens)
    except Exception:  # the answer is already on its way; a lost count must not break it
        log.exception("could not charge %d tokens to %s", tokens, grant.policy.label())


def priority_floor(asked: int | None) -> int | None:
    """The current key's `min_priority` for a request that asked for no priority (it runs there);
    None when the key has no floor or the request asked for one at or above it. A priority asked
    below the floor (more urgent: lower runs first) is refused, naming the field."""
    grant = current.get()
    floor = grant.policy.min_priority if grant is not None else None
    if grant is None or floor is None:
        return None
    if asked is None:
        return floor
    if asked < floor:
        raise PermissionDeniedError(
            f"{grant.policy.label()} may not ask for a priority below {floor} (lower runs first); "
            f"this request asked for {asked}.",
            param="priority",
        )
    return None


def allows(model: str) -> bool:
    """Whether the current key may use `model`."""
    grant = current.get()
    return grant is None or grant.policy.allows(model)
