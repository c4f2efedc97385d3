"""Log lines as text (default) or as one JSON object per line, for log collectors.

    facepq --log-format json node ...        (or FACEPQ_LOG_FORMAT=json, which child processes inherit)

A JSON line holds `time` (UTC, ISO 8601 with milliseconds), `level`, `logger`, `message`, `pid`,
and `exception` (the formatted traceback) when there is one; fields a call passes in `extra=`
are added as they are (when JSON can hold them), so a collector can filter on them.
"""
from __future__ import annotations

import json
import logging
import os
import time

ENV_LOG_FORMAT = "FACEPQ_LOG_FORMAT"
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage(), "pid": record.process}
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def default_log_format() -> str:
    value = os.environ.get(ENV_LOG_FORMAT, "text").strip().lower()
    return value if value in LOG_FORMATS else "text"


def configure_logging(level: int, fmt: str = "text") -> None:
    """The root logger at `level`, writing text or JSON lines to stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT, datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
