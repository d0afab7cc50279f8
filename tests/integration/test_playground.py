"""The browser playground's files over raw HTTP: page, assets, headers, keys, and turning it off.

What the page does in a browser is tested in `tests/live/test_playground_browser.py`.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from importlib.resources import files

import httpx
import openai
import pytest
from fastapi import FastAPI

from chatgate.api.routes.playground import is_playground_path
from chatgate.cli import build_settings, parser
from chatgate.engines.fake import FakeEngine
from chatgate.settings import ServeSettings
from tests.support.app import make_app, raw, running, sdk

pytestmark = pytest.mark.anyio

PLAYGROUND = files("chatgate.api") / "playground"
SCRIPTS = sorted(f.name for f in PLAYGROUND.iterdir() if f.name.endswith(".js"))


class _Page(HTMLParser):
    """What a page loads, and anything that would run or style inline."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.inline: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        self.loads += [v for k, v in attrs if k in ("src", "href") and v]
        self.inline += [f"{tag} {k}" for k, _ in attrs if k.startswith("on") or k == "style"]
        if tag == "style" or (tag == "script" and not named.get("src")):
            self.inline.append(tag)


def assert_secured(headers: httpx.Headers) -> None:
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    assert "frame-ancestors 'none'" in csp
    assert headers["x-content-type-options"] == "nosniff"


async def test_page_and_assets_are_served_with_security_headers(fake_engine: FakeEngine) -> None:
    async with running(make_app(fake_engine)) as app, raw(app) as http:
        page = await http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert_secured(page.headers)
        html = _Page()
        html.feed(page.text)
        assert html.inline == []
        assert {"playground/app.js", "playground/style.css", "playground/icon.svg"} <= set(html.loads)
        for path in html.loads:
            assert not re.match(r"^([a-z]+:|//)", path), f"{path} leaves the server"
            asset = await http.get(f"/{path}")
            assert asset.status_code == 200, path
            assert_secured(asset.headers)
        for name in SCRIPTS:
            script = await http.get(f"/playground/{name}")
            assert script.status_code == 200
            assert "javascript" in script.headers["content-type"]
        assert (await http.get("/playground/style.css")).headers["content-type"].startswith("text/css")


def test_scripts_are_self_contained_and_never_inject_markup() -> None:
    assert "app.js" in SCRIPTS
    for name in SCRIPTS:
        source = (PLAYGROUND / name).read_text()
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", source), name
        assert not re.search(r"https?://", source), f"{name} names another origin"
        for target in re.findall(r'from "([^"]+)"', source):
            assert target.startswith("./") and target[2:] in SCRIPTS, f"{name} imports {target}"


async def test_unknown_assets_get_an_openai_shaped_404(fake_app: FastAPI) -> None:
    async with raw(fake_app) as http:
        for path in ("/playground/nope.js", "/playground/", "/playground/%2e%2e/routes/openai.py"):
            r = await http.get(path)
            assert r.status_code == 404, path
            assert r.json()["error"]["type"] == "invalid_request_error"


async def test_no_playground_turns_it_off(fake_engine: FakeEngine) -> None:
    assert build_settings(ServeSettings, parser().parse_args(["serve", "--no-playground"])).playground is False
    assert build_settings(ServeSettings, parser().parse_args(["serve"])).playground is True
    async with running(make_app(fake_engine, playground=False)) as app, raw(app) as http:
        for path in ("/", "/playground/app.js"):
            r = await http.get(path)
            assert r.status_code == 404 and r.json()["error"]["message"] == f"Invalid URL (GET {path})"
        assert (await http.get("/v1/models")).status_code == 200


async def test_with_api_keys_the_page_loads_but_the_api_needs_a_key(fake_engine: FakeEngine) -> None:
    async with running(make_app(fake_engine, api_keys=["sk-good"])) as app, raw(app) as http:
        assert (await http.get("/")).status_code == 200
        assert (await http.get("/playground/app.js")).status_code == 200
        r = await http.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = await http.get("/v1/models", headers={"Authorization": "Bearer sk-good"})
        assert r.status_code == 200


def test_playground_paths_are_named_in_one_place() -> None:
    assert all(map(is_playground_path, ["/", "/playground", "/playground/app.js"]))
    assert not any(map(is_playground_path, ["/v1/models", "/metrics", "/playgroundx", "/health"]))


async def test_models_say_what_they_serve(fake_app: FastAPI) -> None:
    model = await sdk(fake_app).models.retrieve("fake-model")
    assert model.model_extra == {"capabilities": ["chat", "completions", "embeddings"]}
    listed = await sdk(fake_app).models.list()
    assert listed.data[0].model_extra == {"capabilities": ["chat", "completions", "embeddings"]}
    with pytest.raises(openai.NotFoundError):
        await sdk(fake_app).models.retrieve("nope")
