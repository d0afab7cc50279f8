"""Settings come from flags, then `CHATGATE_*` environment, then defaults."""

from __future__ import annotations

import argparse

import pytest

from chatgate.cli import build_settings, parser
from chatgate.settings import ApiSettings, ServeSettings


def settings_for(argv: list[str]) -> ServeSettings:
    args = parser().parse_args(argv)
    settings: ServeSettings = build_settings(ServeSettings, args)
    return settings


def test_flags_follow_fastchat_names() -> None:
    s = settings_for(["serve", "--port", "9001", "--api-keys", "k1,k2", "--allowed-origins", '["http://a"]'])
    assert s.port == 9001
    assert s.api_keys == ["k1", "k2"]
    assert s.allowed_origins == ["http://a"]


def test_environment_is_used_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATGATE_PORT", "9100")
    monkeypatch.setenv("CHATGATE_API_KEYS", "env-key")
    assert settings_for(["serve"]).port == 9100
    assert settings_for(["serve"]).api_keys == ["env-key"]
    assert settings_for(["serve", "--port", "9200"]).port == 9200


def test_boolean_flags() -> None:
    assert settings_for(["serve", "--ssl"]).ssl is True
    assert settings_for(["serve"]).ssl is False


def test_every_boolean_flag_sets_its_setting_true() -> None:
    """argparse reads any `--no-...` flag as False: `--no-register` once left a worker registering."""
    subcommands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for command, sub in subcommands.choices.items():
        for action in sub._actions:
            if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreConstAction)) and action.option_strings:
                flag = action.option_strings[0]
                assert getattr(parser().parse_args([command, flag]), action.dest) is True, (command, flag)
                checked += 1
    assert checked >= 10
    from chatgate.settings import WorkerSettings

    assert build_settings(WorkerSettings, parser().parse_args(["worker", "--no-register"])).no_register is True
    assert build_settings(WorkerSettings, parser().parse_args(["worker"])).no_register is False


def test_every_subcommand_prints_its_help_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    helps = {}
    for command in ("serve", "api", "worker", "controller", "bench", "soak"):
        with pytest.raises(SystemExit):
            parser().parse_args([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
        assert "option_strings" not in helps[command]  # a "%" once swallowed argparse's internals into the text
    assert "decodes ~8% slower" in helps["worker"]  # --enforce-eager's help, "%" intact


def test_every_subcommand_parses() -> None:
    for command in ("serve", "api", "controller", "worker"):
        assert parser().parse_args([command]).command == command


def test_ssl_takes_fastchat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_KEYFILE", "/k.pem")
    monkeypatch.setenv("SSL_CERTFILE", "/c.pem")
    assert ApiSettings(ssl=True).tls_files() == ("/k.pem", "/c.pem")
    assert ApiSettings().tls_files() == (None, None)


def test_list_flags_repeat_or_take_commas() -> None:
    from chatgate.settings import BenchSettings

    args = parser().parse_args(["bench", "--target", "a=http://x/v1", "--target", "b=http://y/v1"])
    assert build_settings(BenchSettings, args).target == ["a=http://x/v1", "b=http://y/v1"]
    args = parser().parse_args(["bench", "--target", "a=http://x/v1,b=http://y/v1", "--concurrency", "1,4"])
    bench = build_settings(BenchSettings, args)
    assert bench.target == ["a=http://x/v1", "b=http://y/v1"] and bench.concurrency == [1, 4]
    assert settings_for(["serve", "--api-keys", "k1", "--api-keys", "k2"]).api_keys == ["k1", "k2"]


def test_targets_must_be_distinct_names_with_urls() -> None:
    from pydantic import ValidationError

    from chatgate.settings import BenchSettings

    for bad in (["a"], ["=http://x"], ["a="], ["a=http://x", "a=http://y"], ["raw=http://x"]):
        with pytest.raises(ValidationError):
            BenchSettings(target=bad)


def test_serve_embeds_beside_a_local_engine_but_not_in_front_of_an_upstream() -> None:
    def embedding(*argv: str) -> str | None:
        settings = settings_for(["serve", *argv]).embedding_engine_settings()
        return None if settings is None else settings.model_path

    assert embedding() == "default"
    assert embedding("--engine", "openai", "--upstream-url", "http://u/v1") is None
    assert embedding("--engine", "openai", "--embedding-model-path", "default") == "default"  # asked for
    assert embedding("--embedding-model-path", "none") is None
    assert embedding("--enforce-eager") == "default" and settings_for(["serve", "--enforce-eager"]).enforce_eager


@pytest.mark.parametrize("value", ["inf", "nan", "1e308", "-1"])
def test_memory_budgets_are_finite_and_bounded(value: str) -> None:
    """`int(inf * 2**30)` once crashed the engine's start instead of refusing the flag."""
    from pydantic import ValidationError

    from chatgate.settings import EngineSettings

    for field in ("kv_cache_gib", "prefix_cache_gib"):
        with pytest.raises(ValidationError, match=field):
            EngineSettings.model_validate({field: value})


def test_the_worker_takes_several_models_as_serve_does() -> None:
    from chatgate.settings import WorkerSettings

    args = parser().parse_args(["worker", "--engine", "fake", "--model", "a model-names=a,alpha", "--model", "b num-threads=3"])
    settings = build_settings(WorkerSettings, args)
    models = settings.chat_models()
    assert [m.model_names for m in models] == [["a", "alpha"], []]
    assert [m.model_path for m in models] == ["a", "b"] and models[1].num_threads == 3
    assert models[0].num_threads is not None and models[0].num_threads >= 1  # a share of the cores
    with pytest.raises(Exception, match="not both"):
        build_settings(WorkerSettings, parser().parse_args(["worker", "--engine", "fake", "--model", "a", "--model-names", "b"]))
    with pytest.raises(Exception, match="one name"):
        build_settings(WorkerSettings, parser().parse_args(["worker", "--engine", "fake", "--model", "a", "--model", "a"]))
