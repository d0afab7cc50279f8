"""The `chatgate` command: one subcommand per process role, flags generated from settings.

Every flag comes from a field of the process's settings class (`api_keys` -> `--api-keys`), and
every field can also be set as `CHATGATE_<FIELD>` in the environment; a flag wins.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pydantic import BaseModel, ValidationError  # noqa: E402

from chatgate.logs import setup_logging  # noqa: E402
from chatgate.settings import (  # noqa: E402
    ApiProcessSettings,
    ApiSettings,
    BenchSettings,
    ControllerSettings,
    ServeSettings,
    SoakSettings,
    WorkerSettings,
)

EPILOG = """examples:
  chatgate serve                                   # everything in one process on :8000
  chatgate serve --port 9000 --api-keys sk-a,sk-b
  chatgate serve --model default --model 'gemma3-270m model-names=gemma max-model-len=2048'
  chatgate controller --port 21001
  chatgate worker --controller-address http://localhost:21001 --port 21002
  chatgate api --controller-address http://localhost:21001 --port 8000
  chatgate bench --url http://127.0.0.1:8000/v1 --concurrency 1,8,16 --raw --hf-baseline
  chatgate bench --target chatgate=http://127.0.0.1:8000/v1 --target vllm=http://127.0.0.1:8001/v1
  chatgate soak --minutes 10 --kill-every 120 --output-dir soak-results
"""


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls: type[BaseModel]) -> None:
    """One flag per settings field; unset flags fall back to the environment and defaults."""
    for name, info in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"CHATGATE_{name.upper()}"
        # argparse %-formats help text: a literal "%" in a description must be doubled.
        help_text = f"{info.description or ''} [env {env}]".replace("%", "%%")
        if info.annotation is bool and name.startswith("no_"):
            # BooleanOptionalAction reads any `--no-...` as False: `--no-register` would register.
            parser.add_argument(flag, dest=name, action="store_const", const=True, default=None, help=help_text)
        elif info.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif info.annotation == list[str]:  # repeatable: `--target a=URL --target b=URL`
            parser.add_argument(flag, dest=name, action="append", default=None, metavar="VALUE", help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar="VALUE", help=help_text)


def build_settings(settings_cls: type[BaseModel], args: argparse.Namespace) -> Any:
    """Settings from the flags that were given, then the environment, then defaults."""
    given = {k: v for k, v in vars(args).items() if k in settings_cls.model_fields and v is not None}
    for name, value in given.items():
        extra = settings_cls.model_fields[name].json_schema_extra
        if isinstance(extra, dict) and extra.get("one_per_flag"):  # `--model A --model B`: one item each
            continue
        if isinstance(value, list):  # a repeated flag: one value is parsed as given (JSON or commas)
            given[name] = value[0] if len(value) == 1 else ",".join(value)
    return settings_cls(**given)


STARTUP_FAILURE = 3  # uvicorn's exit status when the app cannot start, as uvicorn.run exits


def _run_uvicorn(
    app: Any, *, host: str, port: int, log_level: str, tls: tuple[str | None, str | None] = (None, None),
    access_log: bool = True, **limits: Any
) -> None:
    """Serve `app`; one with a `Drain` in its state drains on SIGTERM before uvicorn shuts down
    (uvicorn then gives what is left a few seconds)."""
    import uvicorn

    from chatgate.drain import DrainingServer
    from chatgate.lifespan import OneLineStartupFailure

    keyfile, certfile = tls
    for flag, path in (("--ssl-keyfile", keyfile), ("--ssl-certfile", certfile)):
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            _cannot_start(f"{flag} {path!r} is not a readable file")
    # Logging is set up already (`logs.setup_logging`): uvicorn's own config would replace it. An
    # API server writes its own access line (`api/access.py`); workers and the controller keep uvicorn's.
    config = uvicorn.Config(OneLineStartupFailure(app), host=host, port=port, log_level=log_level, log_config=None, access_log=access_log,
                            ssl_keyfile=keyfile, ssl_certfile=certfile, timeout_graceful_shutdown=5, **limits)
    drain = getattr(app.state, "drain", None)
    server = DrainingServer(config, drain=drain) if drain is not None else uvicorn.Server(config)
    try:
        server.run()
    except OSError as exc:  # a TLS file that is not a key or certificate (ssl.SSLError), before anything was served
        if server.started:
            raise
        _cannot_start(f"{exc} (--ssl-keyfile {keyfile!r}, --ssl-certfile {certfile!r})" if keyfile or certfile else str(exc))
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)


def _cannot_start(problem: str) -> NoReturn:
    """Stop the process before it served anything, saying why in one line."""
    print(f"chatgate: could not start: {problem}", file=sys.stderr)
    raise SystemExit(STARTUP_FAILURE)


def _api_limits(settings: ApiSettings) -> dict[str, Any]:
    """uvicorn's connection limits for a public endpoint (slow clients cannot pile up forever)."""
    return {
        "limit_concurrency": settings.limit_concurrency,
        "timeout_keep_alive": settings.timeout_keep_alive,
        # Request line and headers larger than this are refused (h11's default is 16 KB).
        "h11_max_incomplete_event_size": 64 * 1024,
    }


def _api_tls(settings: ApiSettings) -> tuple[str | None, str | None]:
    keyfile, certfile = settings.tls_files()
    if settings.ssl and not (keyfile and certfile):
        raise SystemExit("--ssl needs SSL_KEYFILE and SSL_CERTFILE (or --ssl-keyfile/--ssl-certfile)")
    return keyfile, certfile


def _check_memory(configs: list[Any]) -> None:
    """Exit naming the problem, before anything loads, if the models would not fit in memory."""
    from chatgate.engines.memory import check_models_fit
    from chatgate.errors import InsufficientMemoryError

    try:
        check_models_fit(configs)
    except InsufficientMemoryError as exc:
        raise SystemExit(f"chatgate: {exc.message}") from None


def run_serve(settings: ServeSettings) -> None:
    """API server and worker in one process."""
    from chatgate.api.app import create_api_app
    from chatgate.api.workers.local import local_pool

    _check_memory(settings.chat_models())
    app = create_api_app(settings, local_pool(settings))
    _run_uvicorn(app, host=settings.host, port=settings.port, log_level=settings.log_level, tls=_api_tls(settings),
                 access_log=False,
                 **_api_limits(settings))


def run_api(settings: ApiProcessSettings) -> None:
    """API server in front of a controller."""
    from chatgate.api.app import create_api_app
    from chatgate.api.workers.controller import controller_pool

    app = create_api_app(settings, controller_pool(settings))
    _run_uvicorn(app, host=settings.host, port=settings.port, log_level=settings.log_level, tls=_api_tls(settings),
                 access_log=False,
                 **_api_limits(settings))


def run_controller(settings: ControllerSettings) -> None:
    """The controller."""
    from chatgate.controller.app import create_controller_app

    _run_uvicorn(
        create_controller_app(settings), host=settings.host, port=settings.port,
        log_level=settings.log_level, tls=(settings.ssl_keyfile, settings.ssl_certfile),
    )


def run_worker(settings: WorkerSettings) -> None:
    """A model worker."""
    from chatgate.worker.app import create_worker_app

    _check_memory(settings.chat_models())
    _run_uvicorn(
        create_worker_app(settings), host=settings.host, port=settings.port,
        log_level=settings.log_level, tls=(settings.ssl_keyfile, settings.ssl_certfile),
    )


def run_bench(settings: BenchSettings) -> None:
    """Closed-loop streaming load against a URL and, optionally, the engine in-process."""
    from chatgate.bench.run import run_bench as bench

    bench(settings)


def run_soak(settings: SoakSettings) -> None:
    """A fleet under mixed traffic with kills and restarts; a JSON report and a timeline."""
    from chatgate.bench.soak import run_soak as soak

    soak(settings)


COMMANDS: dict[str, tuple[type[BaseModel], Callable[[Any], None], str]] = {
    "serve": (ServeSettings, run_serve, "Serve the default model (or --model-path, or each --model) in one process."),
    "api": (ApiProcessSettings, run_api, "Run the OpenAI API server in front of a controller."),
    "controller": (ControllerSettings, run_controller, "Run the controller workers register with."),
    "worker": (WorkerSettings, run_worker, "Run a model worker that registers with a controller."),
    "bench": (BenchSettings, run_bench, "Measure TTFT, latency and tokens/s at several concurrencies."),
    "soak": (SoakSettings, run_soak, "Soak a fake-engine fleet under mixed traffic, killing and restarting processes."),
}


def parser() -> argparse.ArgumentParser:
    """The full command-line parser."""
    root = argparse.ArgumentParser(
        prog="chatgate",
        description="An OpenAI-compatible LLM serving stack.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (settings_cls, _, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        add_settings_flags(sub, settings_cls)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `chatgate` console script."""
    args = parser().parse_args(argv)
    settings_cls, run, _ = COMMANDS[args.command]
    try:
        settings = build_settings(settings_cls, args)
    except ValidationError as exc:
        messages = [f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" if e["loc"] else e["msg"]
                    for e in exc.errors()]
        print("chatgate: invalid settings\n  " + "\n  ".join(messages), file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(settings.log_level, settings.log_format)
    run(settings)


if __name__ == "__main__":
    main()
