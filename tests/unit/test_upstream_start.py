"""An upstream that does not list its models stops the start in one line that never shows its
credentials (httpx quotes the whole URL in its errors, user:password and query included)."""

from __future__ import annotations

import logging

import httpx
import pytest

from chatgate.errors import StartupError
from chatgate.upstream.service import _upstream_models

pytestmark = pytest.mark.anyio

URL = "http://admin:s3cret@upstream.example:9/v1"


def answering(status: int, body: bytes = b"{}") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(status, content=body)))


def refusing() -> httpx.AsyncClient:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    return httpx.AsyncClient(transport=httpx.MockTransport(refuse))


@pytest.mark.parametrize(("client", "says"), [
    (lambda: answering(401), "HTTP 401"),
    (lambda: answering(200, b"<html>"), "not JSON (JSONDecodeError)"),
    (refusing, "ConnectError: [Errno 111] Connection refused"),
])
async def test_an_upstream_that_does_not_list_its_models_is_named_without_its_credentials(
    client: object, says: str, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO), pytest.raises(StartupError) as raised:
        async with client() as http:  # type: ignore[operator]
            await _upstream_models(http, URL, wait=1.5)  # one retry, logged
    assert str(raised.value) == f"the upstream http://upstream.example:9/v1 did not list its models: {says}"
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("chatgate"))
    assert "waiting for the upstream http://upstream.example:9/v1" in ours
    # (httpx's own request lines carry the URL too; chatgate keeps them at WARNING below debug level.)
    assert "s3cret" not in ours and "admin" not in ours
