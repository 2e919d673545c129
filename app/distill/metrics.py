"""Prometheus metrics served by every worker on `/metrics`.

The training loop calls the `record_*` methods once per step or checkpoint; they only set
Python numbers, and prometheus-client's HTTP server answers scrapes on its own thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from distill.config import MetricsConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerIdentity:
    """Labels that tell the workers of one run apart."""

    experiment: str
    worker: int
    slice_index: int


class TrainingMetrics:
    """The metric set of one worker, in its own registry."""

    def __init__(self, config: MetricsConfig, identity: WorkerIdentity) -> None:
        self.config = config
        self.identity = identity
        self.registry = CollectorRegistry()
        labels = ["experiment", "worker", "slice"]
        self._label_values = (identity.experiment, str(identity.worker), str(identity.slice_index))
        self.loss = Gauge("distill_loss", "Total training loss at the last step.", labels, registry=self.registry)
        self.tokens = Counter(
            "distill_tokens", "Non-padding tokens consumed by this worker.", labels, registry=self.registry
        )
        self.tokens_per_second = Gauge(
            "distill_tokens_per_second", "Non-padding tokens per second of this worker over the last step.",
            labels, registry=self.registry,
        )
        self._server = None
        self.port: int | None = None

    def start(self) -> int | None:
        """Start the HTTP server on its own thread; return the bound port (None when disabled)."""
        if not self.config.enabled:
            logger.info("metrics server disabled")
            return None
        server, _thread = start_http_server(self.config.port, addr=self.config.host, registry=self.registry)
        self._server = server
        self.port = server.server_address[1]
        logger.info("metrics server started on %s:%d/metrics", self.config.host, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            logger.info("metrics server stopped")

    def record_step(
        self,
        *,
        step: int,
        loss: float,
        kl_loss: float,
        ce_loss: float,
        learning_rate: float,
        grad_norm: float | None,
        tokens: int,
        padding_tokens: int,
        global_tokens: int,
        step_seconds: float,
        data_wait_seconds: float,
    ) -> None:
        labels = self._label_values
        self.loss.labels(*labels).set(loss)
        self.tokens.labels(*labels).inc(tokens)
        if step_seconds > 0:
            self.tokens_per_second.labels(*labels).set(tokens / step_seconds)

    def record_checkpoint(self, *, step: int, duration_seconds: float, succeeded: bool) -> None:
        pass

    def record_resume(self, *, step: int) -> None:
        pass
