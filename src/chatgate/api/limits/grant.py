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


def priority_floor() -> int | None:
    """The current key's `min_priority`, if it has one: its requests run no more urgently than this
    where priorities are honoured (the worker applies it; first come, first served ignores it)."""
    grant = current.get()
    return grant.policy.min_priority if grant is not None else None


def check_priority(asked: int | None) -> None:
    """Refuse a `priority` asked below the current key's floor (more urgent: lower runs first)."""
    grant, floor = current.get(), priority_floor()
    if grant is not None and floor is not None and asked is not None and asked < floor:
        raise PermissionDeniedError(
            f"{grant.policy.label()} may not ask for a priority below {floor} (lower runs first); "
            f"this request asked for {asked}.",
            param="priority",
        )


def allows(model: str) -> bool:
    """Whether the current key may use `model`."""
    grant = current.get()
    return grant is None or grant.policy.allows(model)
