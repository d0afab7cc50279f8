"""The official `anthropic` SDK pointed at an app in this process (or a live server's URL)."""

from __future__ import annotations

import anthropic
import httpx2
from fastapi import FastAPI


def anthropic_sdk(app: FastAPI | str, api_key: str = "sk-test") -> anthropic.AsyncAnthropic:
    """The SDK talking to `app` without a network (its base URL has no `/v1`: the SDK adds it)."""
    if isinstance(app, str):
        http = httpx2.AsyncClient(timeout=300, limits=httpx2.Limits(max_keepalive_connections=0))
        return anthropic.AsyncAnthropic(base_url=app, api_key=api_key, http_client=http, max_retries=0)
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://chatgate")
    return anthropic.AsyncAnthropic(base_url="http://chatgate", api_key=api_key, http_client=http, max_retries=0)
