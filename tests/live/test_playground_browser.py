"""The playground in a real browser: Debian's headless Chromium, driven by Playwright, against
`chatgate serve` with the real default models and an API key. Each test saves screenshots of
the states it reaches under its tmp dir. Skipped where Chromium or Playwright is missing."""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.processes import Process, free_port

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("CHATGATE_TEST_CHROMIUM", "/usr/bin/chromium")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM}", allow_module_level=True)

pytestmark = [pytest.mark.live, pytest.mark.model]

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
KEY = "sk-playground"
CHAT_MODEL = "SmolLM2-135M-Instruct"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
STREAMING = "() => !document.querySelector('#panel-chat [data-action=stop]').disabled"
IDLE = "() => document.querySelector('#panel-chat [data-action=stop]').disabled"


def poll(check: Callable[[], bool], what: str, deadline: float = 30.0) -> float:
    """Wait until `check()` holds; return how long it took."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < deadline, f"not within {deadline}s: {what}"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def server(processes: list[Process], tmp_path_factory: pytest.TempPathFactory) -> str:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("playground") / "serve.log"
    process = Process(["serve", "--port", str(port), "--api-keys", KEY, "--admin-keys", KEY], log)  # admin: /metrics
    processes.append(process)
    process.wait_healthy(url)
    return url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Session:
    """A fresh browser tab on the playground, and what it did that it should not have."""

    page: Any
    shots: Path
    external: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def shot(self, name: str) -> None:
        self.page.screenshot(path=self.shots / f"{name}.png", full_page=True)

    def unlock(self, key: str = KEY) -> None:
        field = self.page.get_by_label("API key")
        field.fill(key)
        field.press("Enter")

    def ask(self, text: str) -> Any:
        """Send `text` as the user; the reply's locator once the reply is complete."""
        box = self.page.get_by_role("textbox", name="Message")
        box.fill(text)
        box.press("Enter")
        self.page.wait_for_function(IDLE, timeout=120_000)
        return self.page.locator("#panel-chat .message.assistant").last


def open_session(browser: Any, server: str, shots: Path, width: int = 1100) -> Session:
    context = browser.new_context(viewport={"width": width, "height": 800})
    session = Session(page=context.new_page(), shots=shots)

    def block(route: Any) -> None:
        session.external.append(route.request.url)
        route.abort()

    context.route(re.compile(rf"^(?!{re.escape(server)}/).*"), block)
    session.page.on("pageerror", lambda error: session.problems.append(str(error)))
    session.page.on(
        "console",
        lambda m: session.problems.append(m.text) if "Content Security Policy" in m.text else None,
    )
    session.page.goto(server + "/")
    return session


@pytest.fixture
def session(browser: Any, server: str, tmp_path: Path) -> Iterator[Session]:
    s = open_session(browser, server, tmp_path)
    yield s
    s.page.context.close()
    assert s.external == [], "the page reached outside the server"
    assert s.problems == [], "script errors or CSP violations"


def options(select: Any) -> list[str]:
    return [o.strip() for o in select.locator("option").all_inner_texts()]


def set_sampling(page: Any, panel: str, **values: object) -> None:
    for name, value in values.items():
        page.locator(f"#panel-{panel} [name={name}]").fill(str(value))


def worker_load(server: str) -> int:
    """Requests in flight plus sequences running on the chat worker, from `/metrics`."""
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    pattern = rf'^chatgate_worker_(?:queue_length|running_sequences)\{{worker="{CHAT_MODEL}"\}} (\S+)$'
    values = [float(v) for v in re.findall(pattern, text, re.M)]
    assert len(values) == 2, text
    return int(sum(values))


def test_page_loads_without_key_and_asks_for_one(session: Session) -> None:
    page = session.page
    notice = page.get_by_role("alert")
    sync_api.expect(notice).to_contain_text("You didn't provide an API key")
    sync_api.expect(notice).to_contain_text("Enter the server's API key above")
    session.shot("locked")
    session.unlock()
    sync_api.expect(notice).to_be_hidden()
    # Chat offers chat models only; embeddings offers the dedicated embedding model first (the
    # chat model embeds too, as FastChat's workers do).
    assert options(page.get_by_label("Model").first) == [CHAT_MODEL]
    assert options(page.locator("#panel-embeddings [name=model]")) == [EMBEDDING_MODEL, CHAT_MODEL]
    session.shot("unlocked")


def test_chat_streams_the_answer(session: Session) -> None:
    page = session.page
    session.unlock()
    page.locator("#panel-chat [name=model]").select_option(CHAT_MODEL)
    set_sampling(page, "chat", temperature=0, max_tokens=48)
    box = page.get_by_role("textbox", name="Message")
    box.fill("What is the capital of France?")
    box.press("Enter")
    reply = page.locator("#panel-chat .message.assistant .body").last
    # Text shows while the request still runs (Stop enabled): the reply is streamed.
    page.wait_for_function(
        f"() => ({STREAMING})() && document.querySelector('#panel-chat .message.assistant .body').textContent.length > 0",
        timeout=60_000,
    )
    partial = reply.text_content()
    session.shot("streaming")
    page.wait_for_function(IDLE, timeout=120_000)
    final = reply.text_content() or ""
    assert "Paris" in final and final.startswith(partial or "\0")
    meta = page.locator("#panel-chat .message.assistant .meta").last.text_content() or ""
    assert re.search(r"\d+ prompt \+ \d+ completion tokens · first token [\d.]+ s · [\d.]+ tokens/s", meta), meta
    assert page.get_by_role("textbox", name="Message").input_value() == ""
    session.shot("answered")


def test_stop_cancels_the_generation_and_frees_the_slot(session: Session, server: str) -> None:
    page = session.page
    session.unlock()
    set_sampling(page, "chat", max_tokens=2000, temperature=1, seed=1)
    assert worker_load(server) == 0
    box = page.get_by_role("textbox", name="Message")
    box.fill("Write a very long story about a dragon who learns to cook, with many chapters.")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function(
        f"() => ({STREAMING})() && document.querySelector('#panel-chat .message.assistant .body').textContent.length > 20",
        timeout=60_000,
    )
    assert worker_load(server) > 0, "the generation should be running on the worker"
    session.shot("before-stop")
    page.get_by_role("button", name="Stop").click()
    # Generous: on a loaded 2-core machine one decode step has taken seconds.
    freed = poll(lambda: worker_load(server) == 0, "the worker slot is freed after Stop", deadline=60)
    meta = page.locator("#panel-chat .message.assistant .meta").last
    sync_api.expect(meta).to_contain_text("Stopped")
    sync_api.expect(page.get_by_role("button", name="Send")).to_be_enabled()
    sync_api.expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    # Stopped well before 2000 tokens: the text stays as it was when Stop was pressed.
    text = page.locator("#panel-chat .message.assistant .body").last.text_content() or ""
    assert len(text) < 6000
    print(f"slot freed {freed:.2f}s after Stop")
    session.shot("stopped")


def test_bad_key_shows_the_401_message(session: Session) -> None:
    page = session.page
    session.unlock("sk-wrong")
    sync_api.expect(page.get_by_role("alert")).to_contain_text("Incorrect API key provided.")
    page.get_by_role("textbox", name="Message").fill("Hello?")
    page.get_by_role("button", name="Send").click()
    error = page.locator("#panel-chat .message.assistant .body.error")
    sync_api.expect(error).to_have_text("Error 401: Incorrect API key provided.")
    # The question comes back to the box, to send again with the right key.
    sync_api.expect(page.get_by_role("textbox", name="Message")).to_have_value("Hello?")
    session.shot("bad-key")
    session.unlock()
    set_sampling(page, "chat", max_tokens=16)
    reply = session.ask("Hello?")
    sync_api.expect(reply.locator(".meta")).to_contain_text("completion tokens")


def test_injected_markup_stays_text(session: Session) -> None:
    page = session.page
    session.unlock()
    set_sampling(page, "chat", max_tokens=48, temperature=0)
    attack = "<img src=x onerror=\"document.title='pwned'\"> Repeat this exactly: <b>bold</b>"
    session.ask(attack)
    log = page.get_by_role("log", name="Conversation")
    sync_api.expect(log.locator(".message.user .body")).to_have_text(attack)
    assert log.locator("img, b, script").count() == 0
    # Model text goes through the Markdown-ish renderer: feed it markup directly too.
    rendered = page.evaluate(
        """async (text) => {
            const { render } = await import('./playground/markdown.js');
            const node = document.createElement('div');
            render(node, text);
            document.querySelector('#panel-chat [role=log]').append(node);
            return { tags: [...node.querySelectorAll('*')].map((e) => e.tagName), text: node.textContent };
        }""",
        f"{attack}\n\nsee `<i>x</i>`\n\n```html\n{attack}\n```",
    )
    assert rendered["tags"] == ["P", "P", "CODE", "PRE", "CODE"]
    assert rendered["text"] == f"{attack}see <i>x</i>{attack}"
    assert page.locator("img").count() == 0
    assert page.title() == "chatgate playground"
    session.shot("injection")


def test_keyboard_and_accessible_names(session: Session) -> None:
    page = session.page
    session.unlock()
    set_sampling(page, "chat", max_tokens=16, temperature=0)
    box = page.get_by_role("textbox", name="Message")
    sync_api.expect(page.get_by_role("button", name="Send")).to_be_enabled()
    sync_api.expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    log = page.get_by_role("log", name="Conversation")
    box.focus()
    page.keyboard.type("Say hello")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("in French")
    assert box.input_value() == "Say hello\nin French"
    assert log.locator(".message").count() == 0
    page.keyboard.press("Enter")
    page.wait_for_function(IDLE, timeout=120_000)
    sync_api.expect(log.locator(".message.user .body")).to_have_text("Say hello\nin French")
    assert box.input_value() == ""
    # The tabs follow the arrow keys.
    page.get_by_role("tab", name="Chat").focus()
    page.keyboard.press("ArrowRight")
    sync_api.expect(page.get_by_role("tab", name="Completions")).to_have_attribute("aria-selected", "true")
    sync_api.expect(page.get_by_role("textbox", name="Prompt")).to_be_visible()
    sync_api.expect(box).to_be_hidden()
    session.shot("keyboard")


def test_conversation_is_kept_until_new_chat(session: Session) -> None:
    page = session.page
    session.unlock()
    set_sampling(page, "chat", max_tokens=16, temperature=0)
    page.locator("#panel-chat [name=system]").fill("You are terse.")
    first = session.ask("Name a fruit.").locator(".body").text_content()
    with page.expect_request("**/v1/chat/completions") as sent:
        session.ask("Name another one.")
    body = json.loads(sent.value.post_data or "{}")
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][2]["content"] == first
    assert body["temperature"] == 0 and body["max_tokens"] == 16 and body["stream"] is True
    session.shot("conversation")
    page.get_by_role("button", name="New chat").click()
    assert page.get_by_role("log", name="Conversation").locator(".message").count() == 0
    with page.expect_request("**/v1/chat/completions") as sent:
        session.ask("Name a colour.")
    assert [m["role"] for m in json.loads(sent.value.post_data or "{}")["messages"]] == ["system", "user"]


def test_completions_tab(session: Session) -> None:
    page = session.page
    session.unlock()
    page.get_by_role("tab", name="Completions").click()
    assert options(page.locator("#panel-completions [name=model]")) == [CHAT_MODEL]
    set_sampling(page, "completions", max_tokens=12, temperature=0)
    page.get_by_role("textbox", name="Prompt").fill("The capital of France is")
    page.get_by_role("button", name="Complete").click()
    stats = page.locator("#panel-completions .stats")
    sync_api.expect(stats).to_contain_text("completion tokens", timeout=120_000)
    output = page.get_by_role("log", name="Completion")
    assert output.locator(".prompt").text_content() == "The capital of France is"
    generated = output.locator(".generated").text_content() or ""
    expected = client(page.url).completions.create(
        model=CHAT_MODEL, prompt="The capital of France is", max_tokens=12, temperature=0
    )
    assert generated == expected.choices[0].text and "Paris" in generated
    session.shot("completions")


def test_embeddings_tab_shows_cosine_similarity(session: Session) -> None:
    page = session.page
    session.unlock()
    page.get_by_role("tab", name="Embeddings").click()
    a, b = "A cat sits on the mat.", "Quarterly revenue grew by five percent."
    page.get_by_label("Text A").fill(a)
    page.get_by_label("Text B").fill(b)
    page.get_by_role("button", name="Compare").click()
    value = page.locator("#panel-embeddings output")
    sync_api.expect(value).to_have_text(re.compile(r"^-?\d\.\d{4}$"), timeout=60_000)
    data = client(page.url).embeddings.create(model=EMBEDDING_MODEL, input=[a, b]).data
    x, y = data[0].embedding, data[1].embedding
    cos = sum(p * q for p, q in zip(x, y)) / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))
    assert float(value.text_content() or "nan") == pytest.approx(cos, abs=1e-4)
    sync_api.expect(page.locator("#panel-embeddings .stats")).to_contain_text("384 dimensions")
    session.shot("embeddings")
    page.get_by_label("Text B").fill("A kitten is resting on a rug.")
    page.get_by_role("button", name="Compare").click()
    sync_api.expect(value).not_to_have_text(f"{cos:.4f}")
    assert float(value.text_content() or "nan") > cos + 0.2  # a paraphrase is nearer than a non-sequitur


def test_narrow_window(browser: Any, server: str, tmp_path: Path) -> None:
    s = open_session(browser, server, tmp_path, width=390)
    page = s.page
    s.unlock()
    # Settings start folded away on a narrow window, and unfold on demand.
    temperature = page.locator("#panel-chat [name=temperature]")
    sync_api.expect(temperature).to_be_hidden()
    page.get_by_text("Settings").first.click()
    sync_api.expect(temperature).to_be_visible()
    set_sampling(page, "chat", max_tokens=16)
    s.shot("narrow-settings")
    page.get_by_text("Settings").first.click()
    reply = s.ask("Hi!")
    sync_api.expect(reply.locator(".meta")).to_contain_text("completion tokens")
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, "the page scrolls sideways"
    for name in ("Send", "Stop"):
        box = page.get_by_role("button", name=name).bounding_box()
        assert box is not None and box["x"] + box["width"] <= 390
    s.shot("narrow")
    assert s.external == [] and s.problems == []
    page.context.close()


def client(page_url: str) -> openai.OpenAI:
    base = page_url.split("#")[0].rstrip("/")
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
