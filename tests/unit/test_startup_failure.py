"""A process whose start fails for a reason its operator can fix says so in one line: uvicorn
logs a `StartupError`'s message, not the traceback Starlette hands it; a bug keeps its traceback."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from uvicorn.lifespan.on import LifespanOn

from chatgate.errors import StartupError
from chatgate.lifespan import OneLineStartupFailure
from tests.support.app import make_app, running

pytestmark = pytest.mark.anyio


def failing_app(error: Exception) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        raise error
        yield

    return FastAPI(lifespan=lifespan)


async def start(app: FastAPI) -> LifespanOn:
    """Run the app's start as uvicorn does, wrapped as the CLI wraps it."""
    config = uvicorn.Config(OneLineStartupFailure(app), lifespan="on", log_config=None)
    config.load()
    lifespan = LifespanOn(config)
    await lifespan.startup()
    return lifespan


async def test_a_startup_error_is_one_line_naming_the_problem(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        lifespan = await start(failing_app(StartupError("cannot open the stored responses' file '/x'")))
    assert lifespan.should_exit  # uvicorn stops the process
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["could not start: cannot open the stored responses' file '/x'", "Application startup failed. Exiting."]
    assert "Traceback" not in caplog.text


async def test_any_other_error_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        lifespan = await start(failing_app(RuntimeError("a bug")))
    assert lifespan.should_exit
    assert "Traceback" in caplog.text and "RuntimeError: a bug" in caplog.text


async def test_an_app_that_starts_is_untouched() -> None:
    lifespan = await start(FastAPI())
    assert not lifespan.should_exit
    await lifespan.shutdown()


async def test_a_stored_responses_file_that_cannot_be_made_is_a_startup_error_naming_it() -> None:
    where = Path("/proc/no-such-dir/responses.sqlite3")  # /proc takes no new folders, even as root
    with pytest.raises(StartupError, match=r"'/proc/no-such-dir/responses.sqlite3' \(--responses-path\)"):
        async with running(make_app(responses_store="sqlite", responses_path=where)):
            pass


async def test_the_redis_store_without_a_redis_url_is_a_startup_error() -> None:
    with pytest.raises(StartupError, match="--responses-store redis needs --redis-url"):
        async with running(make_app(responses_store="redis")):
            pass
