"""Log setup for `kubectl logs`: plain text by default, or one JSON object per line.

The JSON form carries Cloud Logging's `severity` and `message` fields, so GKE's logging agent
parses levels and messages without extra configuration.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from distill.config import LoggingConfig


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object with Cloud Logging's field names."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "logger": record.name,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            payload.update(extra)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(config: LoggingConfig) -> None:
    """Send all `distill` and library logs to stdout in the configured format."""
    handler = logging.StreamHandler(sys.stdout)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    # Third-party libraries are chatty at INFO; keep their warnings and errors.
    for name in ("jax", "absl", "easydel", "eformer", "datasets", "transformers", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
