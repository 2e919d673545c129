"""Log output of `distill train`: text and Cloud Logging JSON, worker and step context, rate limits.

Each case runs a fresh Python process, because configure_logging replaces the root handlers
of the process it runs in.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time

import pytest

from distill.logs import RateLimitFilter


def run_logging(body: str, log_format: str = "text") -> list[str]:
    """Run `body` after configure_logging in a new process; return its stdout lines."""
    script = textwrap.dedent(
        f"""
        import logging, warnings
        from distill.config import LoggingConfig, MetricsConfig
        from distill.logs import configure_logging
        configure_logging(LoggingConfig(format={log_format!r}), warning_period_seconds=3600)
        logger = logging.getLogger("distill.test")
        """
    ) + textwrap.dedent(body)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_text_info_line():
    lines = run_logging('logger.info("step %d/%d loss=%.4f", 20, 260, 3.1234)')
    assert len(lines) == 1
    assert lines[0].endswith("INFO distill.test: step 20/260 loss=3.1234")


def test_text_error_names_worker_and_step():
    lines = run_logging(
        """
        from distill.metrics import TrainingMetrics, WorkerIdentity
        metrics = TrainingMetrics(MetricsConfig(enabled=False), WorkerIdentity("exp", 3, 1))
        metrics.record_step(step=120, loss=1.0, kl_loss=1.0, ce_loss=1.0, learning_rate=1e-3, grad_norm=1.0,
                            tokens=1, padding_tokens=0, global_tokens=1, step_seconds=1.0, data_wait_seconds=0.0)
        logger.error("checkpoint failed")
        """
    )
    assert lines[-1].endswith("ERROR distill.test: checkpoint failed [worker 3 slice 1 step 120]")


def test_text_error_before_context():
    lines = run_logging('logger.error("coordinator not reachable")')
    assert lines[0].endswith("coordinator not reachable [worker - slice - step -]")


def test_text_traceback_below_context():
    lines = run_logging(
        """
        try:
            raise RuntimeError("disk full")
        except RuntimeError:
            logger.exception("save failed")
        """
    )
    assert lines[0].endswith("save failed [worker - slice - step -]")
    assert lines[-1] == "RuntimeError: disk full"


def test_json_fields():
    lines = run_logging(
        """
        from distill.logs import set_log_context
        set_log_context(worker=2, slice_index=0, step=7)
        logger.error("loss is nan")
        """,
        log_format="json",
    )
    record = json.loads(lines[0])
    assert record["severity"] == "ERROR"
    assert record["message"] == "loss is nan"
    assert record["worker"] == 2
    assert record["slice"] == 0
    assert record["step"] == 7
    assert record["logger"] == "distill.test"
    assert record["time"].endswith("Z")


def test_json_exception_field():
    lines = run_logging(
        """
        try:
            raise ValueError("bad shape")
        except ValueError:
            logger.exception("step failed")
        """,
        log_format="json",
    )
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert "ValueError: bad shape" in record["exception"]


def test_repeated_warning_rate_limited():
    lines = run_logging(
        """
        for attempt in range(50):
            logger.warning("slow data source %s", attempt)
        """
    )
    assert len(lines) == 1
    assert lines[0].endswith("slow data source 0 [worker - slice - step -]")


def test_distinct_warnings_pass():
    lines = run_logging(
        """
        logger.warning("first problem")
        logger.warning("second problem")
        """
    )
    assert len(lines) == 2


def test_errors_never_rate_limited():
    lines = run_logging(
        """
        for attempt in range(5):
            logger.error("read failed %s", attempt)
        """
    )
    assert len(lines) == 5


def test_python_warnings_rate_limited():
    lines = run_logging(
        """
        warnings.simplefilter("always")
        for _ in range(20):
            warnings.warn("deprecated flag", DeprecationWarning)
        """
    )
    # A captured warning is two lines: the message, then the source line (empty for -c code).
    assert len([line for line in lines if "deprecated flag" in line]) == 1


def test_suppressed_count_reported():
    limiter = RateLimitFilter(period_seconds=0.05)

    def record(attempt: int) -> logging.LogRecord:
        return logging.LogRecord("distill.test", logging.WARNING, __file__, 10, "retrying %d", (attempt,), None)

    assert limiter.filter(record(1))
    assert not limiter.filter(record(2))
    assert not limiter.filter(record(3))
    time.sleep(0.06)
    later = record(4)
    assert limiter.filter(later)
    assert later.getMessage() == "retrying 4 (2 similar warnings suppressed in the last 0.05 s)"


def test_rate_limit_rejects_zero_period():
    with pytest.raises(ValueError, match="period_seconds=0"):
        RateLimitFilter(period_seconds=0)
