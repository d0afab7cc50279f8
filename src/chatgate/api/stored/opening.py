"""Which backend keeps stored responses, as the settings choose."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from chatgate.api.stored.backend import Backend, Bounds, MemoryBackend
from chatgate.api.stored.store import ResponseStore
from chatgate.errors import StartupError
from chatgate.settings import ApiSettings, default_cache_dir


def store_kind(settings: ApiSettings) -> str:
    """The backend's name: `--responses-store`, or for auto Redis with `--redis-url`, else SQLite."""
    if settings.responses_store != "auto":
        return settings.responses_store
    return "redis" if settings.redis_url else "sqlite"


def sqlite_path(settings: ApiSettings) -> Path:
    """The SQLite file: `--responses-path`, else in the cache directory (the models' one)."""
    if settings.responses_path is not None:
        return settings.responses_path
    cache: Path = getattr(settings, "cache_dir", None) or default_cache_dir()  # `serve` has one; `api` the default
    return cache / "responses.sqlite3"


async def open_store(settings: ApiSettings) -> ResponseStore:
    """The stored responses' store, opened (a file created, or a Redis client made)."""
    bounds = Bounds(ttl=settings.responses_ttl, max_count=settings.responses_max_count, max_bytes=settings.responses_max_bytes)
    kind = store_kind(settings)
    backend: Backend
    if kind == "memory":
        backend = MemoryBackend(bounds)
    elif kind == "redis":
        assert settings.redis_url, "the settings refuse --responses-store redis without --redis-url"
        from chatgate.api.stored.redis_backend import RedisBackend  # Redis only where asked for

        backend = RedisBackend(settings.redis_url, bounds)
    else:
        from chatgate.api.stored.sqlite import SqliteBackend

        path = sqlite_path(settings)
        try:
            backend = await SqliteBackend.open(path, bounds)
        except (OSError, sqlite3.Error) as exc:
            raise StartupError(f"cannot open the stored responses' file {str(path)!r} (--responses-path): {exc}") from exc
    return ResponseStore(backend)
