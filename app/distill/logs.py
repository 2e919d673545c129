"""Log setup for `kubectl logs`: plain text by default, or one JSON object per line.

The JSON form carries Cloud Logging's `severity` and `message` fields, so GKE's logging agent
parses levels and messages without extra configuration, plus `worker`, `slice` and `step`.
Text lines at WARNING and above end with the worker and step, so an error read from a
merged log of many pods still shows where it happened.

Repeated warnings (same logger, source line and message template) are rate-limited: the
first one in each period is printed, the rest are counted and the count is appended to the
next one that is printed.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

from distill.config import LoggingConfig

DEFAULT_WARNING_PERIOD_SECONDS = 60.0

_context_lock = threading.Lock()
_context: dict[str, int | None] = {"worker": None, "slice": None, "step": None}


def set_log_context(*, worker: int | None = None, slice_index: int | None = None, step: int | None = None) -> None:
    """Set the worker, slice and step that log lines carry; arguments left as None keep their value.

    distill.metrics.TrainingMetrics calls this with its identity and on every recorded step.
    """
    with _context_lock:
        if worker is not None:
            _context["worker"] = worker
        if slice_index is not None:
            _context["slice"] = slice_index
        if step is not None:
            _context["step"] = step


class ContextFilter(logging.Filter):
    """Attach the current worker, slice and step to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        with _context_lock:
            record.worker = _context["worker"]
            record.slice = _context["slice"]
            record.step = _context["step"]
        return True


class RateLimitFilter(logging.Filter):
    """Pass the first WARNING of each kind per period and count the rest.

    A kind is (logger name, source line, unformatted message), so warnings that differ only
    in their arguments count as repeats. ERROR and above always pass.
    """

    def __init__(self, period_seconds: float = DEFAULT_WARNING_PERIOD_SECONDS) -> None:
        super().__init__()
        if period_seconds <= 0:
            raise ValueError(f"period_seconds={period_seconds} is invalid; it must be positive")
        self.period_seconds = period_seconds
        self._lock = threading.Lock()
        # kind -> [time the last printed warning of that kind was let through, suppressed count]
        self._kinds: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True

        # Captured Python warnings all arrive as logger.warning("%s", text) from one line.
        template = record.getMessage() if record.name == "py.warnings" else str(record.msg)
        kind = (record.name, record.lineno, template)
        now = time.monotonic()
        with self._lock:
            state = self._kinds.get(kind)
            if state is None:
                self._kinds[kind] = [now, 0]
                return True
            if now - state[0] < self.period_seconds:
                state[1] += 1
                return False
            suppressed = int(state[1])
            state[0] = now
            state[1] = 0

        if suppressed:
            record.msg = f"{record.getMessage()} ({suppressed} similar warnings suppressed in the last {self.period_seconds:g} s)"
            record.args = None
        return True


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object with Cloud Logging's field names."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "logger": record.name,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        }
        for field in ("worker", "slice", "step"):
            value = getattr(record, field, None)
            if value is not None:
                payload[field] = value
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            payload.update(extra)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    """Plain text; WARNING and above end with `[worker W slice S step N]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.levelno < logging.WARNING:
            return line

        def show(value: object) -> str:
            return "-" if value is None else str(value)

        where = (
            f" [worker {show(getattr(record, 'worker', None))} slice {show(getattr(record, 'slice', None))}"
            f" step {show(getattr(record, 'step', None))}]"
        )
        # Keep a traceback below the line that names worker and step.
        first, newline, rest = line.partition("\n")
        return first + where + newline + rest


def configure_logging(config: LoggingConfig, *, warning_period_seconds: float = DEFAULT_WARNING_PERIOD_SECONDS) -> None:
    """Send all `distill` and library logs (and Python warnings) to stdout in the configured format."""
    handler = logging.StreamHandler(sys.stdout)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(RateLimitFilter(warning_period_seconds))

    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    # warnings.warn() from JAX and friends repeats every step; route it through the rate limit.
    logging.captureWarnings(True)
    # Third-party libraries are chatty at INFO; keep their warnings and errors.
    for name in ("jax", "absl", "easydel", "eformer", "datasets", "transformers", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
