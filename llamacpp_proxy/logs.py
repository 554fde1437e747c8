"""Logging set-up: plain or JSON lines; access records carry their fields in `record.access`."""

from __future__ import annotations

import json
import logging
import sys
import time


class PlainFormatter(logging.Formatter):
    """`time level logger message`, access lines as key=value pairs."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = getattr(record, "access", None)
        if fields is not None:
            message = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        else:
            message = record.getMessage()
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname} {record.name}: {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "access", None)
        if fields is not None:
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str, json_lines: bool) -> None:
    """Route every logger to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Tornado's own access log would duplicate ours.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
