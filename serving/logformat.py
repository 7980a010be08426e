"""How every log line is written, in each process of the server (the engine process's
too): plain text or one JSON object per line (`--log-format`). `serving.api.logs`
writes the request lines with these formats."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

FORMATS = ("text", "json")


def configure(fmt: str = "text", level: int = logging.INFO) -> None:
    """Every log line to stderr, as text (`time logger: message key=value ...`) or as
    one JSON object per line."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def fields(record: logging.LogRecord) -> dict:
    return getattr(record, "fields", None) or {}


class TextFormatter(logging.Formatter):
    """`2024-05-01 12:00:00,123 logger: message key=value ...`; a value with spaces,
    quotes, `=` or anything but visible ASCII is written as a JSON string."""

    def __init__(self):
        super().__init__("%(asctime)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = " ".join(f"{k}={_text_value(v)}" for k, v in fields(record).items())
        return f"{line} {pairs}" if pairs else line


def _text_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    plain = text and all("!" <= c <= "~" and c not in '"=\\' for c in text)
    return text if plain else json.dumps(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the
    record's fields, and the traceback as `exception` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def current() -> str:
    """The format this process's log lines are written in now ("text" or "json"): what a
    child process is told to use."""
    json_lines = any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
    return "json" if json_lines else "text"
