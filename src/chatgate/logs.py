"""How every process logs: the level, and text or JSON lines.

`--log-format json` writes one JSON object per line (time, level, logger, message, and an access
line's fields at the top level) for log shippers; `text` is for people and carries the same
fields as `key=value` pairs. uvicorn's own access log is off in both: the API server writes its
own access line (`api/access.py`), with the fields an operator needs.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]


class JsonFormatter(logging.Formatter):
    """One JSON object per record: the standard fields, then an access line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "access", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """The usual text line, with an access line's fields after it as `key=value`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "access", None)
        if not fields:
            return text
        return text + " " + " ".join(f"{name}={_text(value)}" for name, value in fields.items() if value is not None)


def _text(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


def setup_logging(level: str, log_format: LogFormat = "text") -> None:
    """Send every logger's records to stderr, at `level`, in `log_format`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # through the root handler, in the same format
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    if level != "debug":  # one line per outgoing request is noise at info level
        logging.getLogger("httpx").setLevel(logging.WARNING)
