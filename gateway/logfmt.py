"""Log line formats: readable text for a terminal or the journal, JSON lines for log shippers.

Both carry the same fields (time, level, logger, message); JSON adds nothing a text line lacks
except the exception text as its own field, so a shipper never parses free text.
"""

from __future__ import annotations

import json
import logging
import time

TEXT_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
TEXT_DATEFMT = "%Y-%m-%dT%H:%M:%S"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``{"time", "level", "logger", "message"[, "exception"]}``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime(TEXT_DATEFMT, time.localtime(record.created))
        entry = {
            "time": f"{stamp}.{int(record.msecs):03d}{time.strftime('%z', time.localtime(record.created))}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)
