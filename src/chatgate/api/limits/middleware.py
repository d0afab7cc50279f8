"""The ASGI layer of per-key limits: admit or refuse (429) before the body is read, add
OpenAI's `x-ratelimit-*` headers to every response of a limited key, hold the parallel slot's
lease while the response runs and give it back when it is done (`lease.py`)."""

from __future__ import annotations

import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatgate import tracing
from chatgate.api.auth import caller
from chatgate.api.errors import error_response
from chatgate.api.limits import grant
from chatgate.api.limits.lease import LeaseKeeper
from chatgate.api.limits.policy import KeyPolicy
from chatgate.api.limits.store import LimitStore, Usage
from chatgate.errors import ChatgateError, RateLimitExceededError

_NAMES = {"requests": "requests per minute (rpm)", "tokens": "tokens per minute (tpm)", "parallel": "parallel requests"}


class RateLimitMiddleware:
    """Applies the caller's policy; callers without one (or requests without keys) pass untouched."""

    def __init__(self, app: ASGIApp, *, store: LimitStore, leases: LeaseKeeper | None = None) -> None:
        self.app = app
        self.store = store
        self.leases = leases or LeaseKeeper(store)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The caller `IdentityMiddleware` parsed from the request's one key header.
        who = caller.get() if scope["type"] == "http" else None
        policy = who.policy if who is not None else None
        if who is None or policy is None:
            await self.app(scope, receive, send)
            return
        name = who.store_key
        try:
            with tracing.span("chatgate.limits") as span:
                usage = await self.store.admit(name, policy) if policy.limited() else None
                if usage is not None and usage.refused is not None:
                    span.set_attribute("chatgate.limits.refused", usage.refused)
        except ChatgateError as exc:
            await error_response(exc, scope=scope)(scope, receive, send)
            return
        headers = [(k.encode(), v.encode()) for k, v in usage.headers(policy)] if usage else []
        if usage is not None and usage.refused is not None:
            await self._refuse(policy, usage, headers, scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        token = grant.current.set(grant.Grant(key=name, policy=policy, store=self.store))
        try:
            async with self.leases.held(name, usage.lease) if usage and usage.lease else contextlib.nullcontext():
                await self.app(scope, receive, send_with_headers)
        finally:
            grant.current.reset(token)

    async def _refuse(
        self, policy: KeyPolicy, usage: Usage, headers: list[tuple[bytes, bytes]], scope: Scope, receive: Receive, send: Send
    ) -> None:
        refused = usage.refused or "requests"
        limit = {"requests": policy.rpm, "tokens": policy.tpm, "parallel": policy.max_parallel_requests}[refused]
        used = {"requests": usage.requests, "tokens": usage.tokens}.get(refused, limit)
        wait = usage.retry_after()
        error = RateLimitExceededError(
            f"Rate limit reached for {_NAMES[refused]} on {policy.label()}: Limit {limit}, Used {used}. "
            f"Please try again in {wait:.1f}s.",
            retry_after=wait,
        )
        response = error_response(error, scope=scope)
        response.raw_headers.extend(headers)
        await response(scope, receive, send)
