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
from pydantic import ValidationError
from uvicorn.lifespan.on import LifespanOn

from chatgate.cli import _run_uvicorn
from chatgate.engines.fake import FakeEngine
from chatgate.errors import InsufficientMemoryError, StartupError
from chatgate.lifespan import OneLineStartupFailure
from chatgate.settings import EngineSettings, ServeSettings
from chatgate.worker.backend import open_backends
from tests.support.app import make_app, running
from tests.support.processes import free_port

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


def test_a_flag_missing_its_partner_is_refused_with_the_settings_before_anything_loads() -> None:
    # Once found only when the app started, after the models had loaded.
    with pytest.raises(ValidationError, match="--responses-store redis needs --redis-url"):
        ServeSettings(responses_store="redis")


class FailingStart(FakeEngine):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def start(self) -> None:
        raise self.error


async def open_failing(error: Exception) -> None:
    async with open_backends([(EngineSettings(engine="fake"), FailingStart(error))]):
        pass


async def test_a_model_that_cannot_open_its_files_or_fit_is_a_startup_error_saying_what() -> None:
    with pytest.raises(StartupError, match="^TimeoutError$"):  # an OSError with no message still says what it was
        await open_failing(TimeoutError())
    with pytest.raises(StartupError, match=r"^PermissionError: \[Errno 13\] denied: '/m'$"):
        await open_failing(PermissionError(13, "denied", "/m"))
    with pytest.raises(StartupError, match="^Loading the model `m` needs more memory$"):
        await open_failing(InsufficientMemoryError("Loading the model `m` needs more memory"))


async def test_a_bugs_value_error_is_not_passed_off_as_the_operators_to_fix() -> None:
    # Found in review: every ValueError used to become one line, a bug's too, its place lost.
    with pytest.raises(ValueError, match="not enough values") as raised:
        await open_failing(ValueError("not enough values to unpack (expected 2, got 1)"))
    assert not isinstance(raised.value, StartupError)  # so its traceback stays


def test_a_tls_file_that_is_missing_or_not_one_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for tls, says in [
        (("/no/such/key.pem", "/no/such/cert.pem"), "--ssl-keyfile '/no/such/key.pem' is not a readable file"),
        ((str(tmp_path), "/no/such/cert.pem"), f"--ssl-keyfile '{tmp_path}' is not a readable file"),
    ]:
        with pytest.raises(SystemExit) as exited:
            _run_uvicorn(FastAPI(), host="127.0.0.1", port=free_port(), log_level="error", tls=tls)
        assert exited.value.code == 3 and capsys.readouterr().err == f"chatgate: could not start: {says}\n"
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(SystemExit) as exited:
        _run_uvicorn(FastAPI(), host="127.0.0.1", port=free_port(), log_level="error", tls=(str(junk), str(junk)))
    err = capsys.readouterr().err
    assert exited.value.code == 3 and err.startswith("chatgate: could not start: [SSL]"), err
    assert f"(--ssl-keyfile '{junk}', --ssl-certfile '{junk}')" in err
