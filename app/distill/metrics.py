"""Prometheus metrics served by every worker on `/metrics`.

The training loop calls the `record_*` methods once per step or checkpoint. They only update
Python numbers under prometheus-client's locks. The HTTP server serves scrapes on its own
thread, so a scrape never blocks a step.

Every series carries the labels `experiment`, `worker` (index within the slice) and `slice`,
so scraping all pods of a run gives one series per worker and no clashes.

Global metrics hold the same value on every worker; aggregate them with `max by (experiment)`:
  distill_loss, distill_kl_loss, distill_ce_loss, distill_learning_rate, distill_grad_norm,
  distill_last_completed_step, distill_steps_total, distill_job_tokens_per_second,
  distill_chip_flops_per_second, distill_mfu_ratio, distill_peak_chip_flops_per_second,
  distill_total_steps, distill_expected_workers, distill_restart_attempt.
Per-worker metrics add up across workers; aggregate them with `sum by (experiment)`:
  distill_tokens_total, distill_padding_tokens_total, distill_worker_tokens_per_second,
  distill_data_wait_seconds_total.
Per-worker state (compare or take the max, do not add): distill_step_duration_seconds
(a histogram: sum its buckets, then take quantiles), distill_last_step_data_wait_seconds,
distill_heartbeat_timestamp_seconds, distill_start_time_seconds, the checkpoint metrics,
distill_resumes_total, distill_resumed_from_step and distill_info.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

from distill import __version__
from distill.config import MetricsConfig
from distill.logs import set_log_context

logger = logging.getLogger(__name__)

LABELS = ("experiment", "worker", "slice")

# Step times range from tens of milliseconds (tiny CPU runs) to minutes (a 14B teacher on
# a small slice). Bounds are about 1.5x apart, so p50/p95 interpolate within about 25%.
STEP_SECONDS_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0, 600.0,
)

DEFAULT_THROUGHPUT_WINDOW_STEPS = 10


@dataclass(frozen=True)
class WorkerIdentity:
    """Labels that tell the workers of one run apart."""

    experiment: str
    worker: int
    slice_index: int


class _LazyGauge:
    """A labelled gauge whose series appears only once a value is set.

    prometheus-client exports a labelled child at 0 as soon as it exists. An unknown value
    (MFU on CPU, the last checkpoint before the first one) must be absent instead.
    """

    def __init__(self, parent: Gauge, label_values: tuple[str, ...]) -> None:
        self._parent = parent
        self._label_values = label_values
        self._child: Gauge | None = None

    def set(self, value: float) -> None:
        if self._child is None:
            self._child = self._parent.labels(*self._label_values)
        self._child.set(value)


class _ScrapeHandler(WSGIRequestHandler):
    """Request handler that logs nothing per scrape and reports each served request.

    The report comes after the response is written, so `TrainingMetrics.wait_for_scrape`
    returns only once Prometheus has the values.
    """

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (base class name)
        pass

    def handle(self) -> None:
        started = time.monotonic()
        super().handle()
        self.server.on_request_answered(started)


class TrainingMetrics:
    """The metric set of one worker, in its own registry, with its HTTP exporter."""

    def __init__(
        self,
        config: MetricsConfig,
        identity: WorkerIdentity,
        *,
        throughput_window_steps: int = DEFAULT_THROUGHPUT_WINDOW_STEPS,
    ) -> None:
        if throughput_window_steps <= 0:
            raise ValueError(
                f"throughput_window_steps={throughput_window_steps} is invalid; pass a positive number of steps"
            )
        self.config = config
        self.identity = identity
        self.registry = CollectorRegistry()
        self.port: int | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._last_scrape_started = -math.inf
        self._scrape_condition = threading.Condition()
        self._flops_per_token: float | None = None
        self._total_chips: int | None = None
        self._peak_flops_per_chip: float | None = None
        # (tokens, global_tokens, step_seconds) of the last steps, for tokens/s over a window.
        self._window: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=throughput_window_steps)

        # `<counter>_created` series would add one series per counter and histogram to every
        # scrape; the counters' start is already distill_start_time_seconds. Process-wide switch.
        disable_created_metrics()
        self._create_metrics()
        self.start_time.set(time.time())
        set_log_context(worker=identity.worker, slice_index=identity.slice_index)

    def _create_metrics(self) -> None:
        registry = self.registry
        values = (self.identity.experiment, str(self.identity.worker), str(self.identity.slice_index))

        def gauge(name: str, documentation: str) -> _LazyGauge:
            return _LazyGauge(Gauge(name, documentation, LABELS, registry=registry), values)

        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, LABELS, registry=registry).labels(*values)

        # Learning.
        self.loss = gauge("distill_loss", "Total distillation loss at the last completed step.")
        self.kl_loss = gauge("distill_kl_loss", "KL (teacher to student) term of the loss at the last completed step.")
        self.ce_loss = gauge("distill_ce_loss", "Cross-entropy term of the loss at the last completed step.")
        self.learning_rate = gauge("distill_learning_rate", "Learning rate used at the last completed step.")
        self.grad_norm = gauge("distill_grad_norm", "Global L2 norm of the gradients at the last completed step.")
        self.steps = counter("distill_steps", "Optimizer steps completed by this process.")
        self.last_step = gauge("distill_last_completed_step", "Index of the last completed optimizer step.")
        self.total_steps = gauge("distill_total_steps", "Optimizer steps the run is configured to take.")

        # Throughput.
        self.tokens = counter("distill_tokens", "Non-padding tokens consumed by this worker.")
        self.padding_tokens = counter("distill_padding_tokens", "Padding tokens in the batches of this worker.")
        self.worker_tokens_per_second = gauge(
            "distill_worker_tokens_per_second",
            "Non-padding tokens per second of this worker over the last steps (see throughput window).",
        )
        self.job_tokens_per_second = gauge(
            "distill_job_tokens_per_second",
            "Non-padding tokens per second of the whole job over the last steps (same on every worker).",
        )
        self.step_duration = Histogram(
            "distill_step_duration_seconds",
            "Wall time of one optimizer step, including the wait for data.",
            LABELS,
            buckets=STEP_SECONDS_BUCKETS,
            registry=registry,
        ).labels(*values)
        self.data_wait = counter("distill_data_wait_seconds", "Time the steps of this worker waited for input data.")
        self.last_data_wait = gauge(
            "distill_last_step_data_wait_seconds", "Time the last step of this worker waited for input data."
        )

        # Efficiency: set only when a FLOPs model and the accelerator's peak are known.
        self.chip_flops = gauge(
            "distill_chip_flops_per_second", "Achieved model FLOP/s per chip over the last steps (FLOPs model in distill.flops)."
        )
        self.peak_chip_flops = gauge("distill_peak_chip_flops_per_second", "Dense bf16 peak FLOP/s of one chip.")
        self.mfu = gauge("distill_mfu_ratio", "Model FLOPs utilisation: achieved over peak FLOP/s per chip (0 to 1).")

        # Checkpoints, resumes and restarts.
        self.checkpoint_step = gauge("distill_checkpoint_last_success_step", "Step of the last committed checkpoint.")
        self.checkpoint_time = gauge(
            "distill_checkpoint_last_success_timestamp_seconds", "Unix time when the last checkpoint was committed."
        )
        self.checkpoint_duration = gauge(
            "distill_checkpoint_duration_seconds", "Wall time of the last checkpoint attempt, successful or not."
        )
        self.checkpoints = counter("distill_checkpoints", "Checkpoints committed by this process.")
        self.checkpoint_failures = counter("distill_checkpoint_failures", "Checkpoint attempts that failed in this process.")
        self.resumes = counter("distill_resumes", "Resumes from a checkpoint by this process (0 or 1).")
        self.resumed_from_step = gauge("distill_resumed_from_step", "Step of the checkpoint this process resumed from.")
        self.restart_attempt = gauge(
            "distill_restart_attempt", "Restart attempt of the JobSet (0 for the first run), when the chart passes it."
        )

        # Liveness and identity.
        self.start_time = gauge("distill_start_time_seconds", "Unix time when this process started its exporter.")
        self.heartbeat = gauge(
            "distill_heartbeat_timestamp_seconds", "Unix time of the last completed step (the exporter's start before that)."
        )
        self.expected_workers = gauge("distill_expected_workers", "Worker processes the job runs (slices x hosts per slice).")
        self.info = Info(
            "distill", "Identity of this worker: run layout, accelerator and distill version.", LABELS, registry=registry
        ).labels(*values)

    def start(self) -> int | None:
        """Start the HTTP server on its own thread; return the bound port (None when disabled)."""
        if not self.config.enabled:
            logger.info("metrics server disabled (metrics.enabled is false)")
            return None

        try:
            server = make_server(
                self.config.host,
                self.config.port,
                make_wsgi_app(self.registry),
                ThreadingWSGIServer,
                handler_class=_ScrapeHandler,
            )
        except OSError as error:
            raise OSError(
                f"metrics server could not listen on {self.config.host}:{self.config.port}: {error}; "
                "choose a free metrics.port (0 picks one) or set metrics.enabled to false"
            ) from error
        server.on_request_answered = self._on_request_answered
        thread = threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True)
        thread.start()

        self._server = server
        self._thread = thread
        self.port = server.server_address[1]
        self.heartbeat.set(time.time())
        logger.info("metrics server started on %s:%d/metrics", self.config.host, self.port)
        return self.port

    def stop(self, *, final_scrape_timeout_seconds: float | None = None) -> None:
        """Stop the HTTP server.

        With a positive `final_scrape_timeout_seconds`, first wait up to that long for one
        more scrape, so Prometheus records the final step's values before the pod exits.
        None means the config's `final_scrape_timeout_seconds`, or no wait when the config
        has no such field. Pass 0 when stopping for a failure or preemption.
        """
        if self._server is None:
            return
        if final_scrape_timeout_seconds is None:
            final_scrape_timeout_seconds = float(getattr(self.config, "final_scrape_timeout_seconds", 0.0))

        if final_scrape_timeout_seconds > 0:
            received = self.wait_for_scrape(final_scrape_timeout_seconds)
            if not received:
                logger.warning(
                    "no scrape of the final metrics within %.1f s; the last values may be missing in Prometheus",
                    final_scrape_timeout_seconds,
                )

        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None
        logger.info("metrics server stopped")

    def wait_for_scrape(self, timeout_seconds: float) -> bool:
        """Wait until a scrape that started after this call is served; return False on timeout."""
        called = time.monotonic()
        with self._scrape_condition:
            return self._scrape_condition.wait_for(
                lambda: self._last_scrape_started >= called, timeout=timeout_seconds
            )

    def _on_request_answered(self, started: float) -> None:
        with self._scrape_condition:
            self._last_scrape_started = max(self._last_scrape_started, started)
            self._scrape_condition.notify_all()

    def set_info(
        self,
        *,
        num_slices: int,
        hosts_per_slice: int,
        accelerator: str,
        tpu_type: str = "",
        total_steps: int | None = None,
        restart_attempt: int | None = None,
        version: str = __version__,
    ) -> None:
        """Publish the run layout once, after the runtime is initialised."""
        self.info.info(
            {
                "slices": str(num_slices),
                "hosts_per_slice": str(hosts_per_slice),
                "hosts": str(num_slices * hosts_per_slice),
                "accelerator": accelerator,
                "tpu_type": tpu_type,
                "version": version,
            }
        )
        self.expected_workers.set(num_slices * hosts_per_slice)
        if total_steps is not None:
            self.total_steps.set(total_steps)
        if restart_attempt is not None:
            self.restart_attempt.set(restart_attempt)

    def set_flops_per_token(
        self, flops_per_token: float, *, total_chips: int, peak_flops_per_chip: float | None
    ) -> None:
        """Enable the efficiency metrics.

        `flops_per_token` comes from distill.flops.training_flops_per_token, `total_chips`
        counts the chips of the whole job, and `peak_flops_per_chip` from
        distill.flops.peak_flops_per_chip. A None peak (CPU) leaves MFU absent.
        """
        if flops_per_token <= 0:
            raise ValueError(f"flops_per_token={flops_per_token} is invalid; it must be positive")
        if total_chips <= 0:
            raise ValueError(f"total_chips={total_chips} is invalid; it must be a positive count")
        self._flops_per_token = flops_per_token
        self._total_chips = total_chips
        self._peak_flops_per_chip = peak_flops_per_chip
        if peak_flops_per_chip is not None:
            self.peak_chip_flops.set(peak_flops_per_chip)

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
        """Record one completed optimizer step.

        `tokens` and `padding_tokens` count this worker's batch, `global_tokens` the
        non-padding tokens of the whole job's step; `step_seconds` is the step's wall time
        including `data_wait_seconds`. Also sets the step shown in log lines.
        """
        self.loss.set(loss)
        self.kl_loss.set(kl_loss)
        self.ce_loss.set(ce_loss)
        self.learning_rate.set(learning_rate)
        if grad_norm is not None:
            self.grad_norm.set(grad_norm)
        self.steps.inc()
        self.last_step.set(step)

        self.tokens.inc(tokens)
        self.padding_tokens.inc(padding_tokens)
        self.step_duration.observe(step_seconds)
        self.data_wait.inc(data_wait_seconds)
        self.last_data_wait.set(data_wait_seconds)
        self._update_throughput(tokens, global_tokens, step_seconds)

        self.heartbeat.set(time.time())
        set_log_context(step=step)

    def _update_throughput(self, tokens: int, global_tokens: int, step_seconds: float) -> None:
        self._window.append((tokens, global_tokens, step_seconds))
        seconds = sum(item[2] for item in self._window)
        if seconds <= 0:
            return

        worker_rate = sum(item[0] for item in self._window) / seconds
        job_rate = sum(item[1] for item in self._window) / seconds
        self.worker_tokens_per_second.set(worker_rate)
        self.job_tokens_per_second.set(job_rate)

        if self._flops_per_token is None or self._total_chips is None:
            return
        chip_flops = self._flops_per_token * job_rate / self._total_chips
        self.chip_flops.set(chip_flops)
        if self._peak_flops_per_chip is not None:
            self.mfu.set(chip_flops / self._peak_flops_per_chip)

    def record_checkpoint(self, *, step: int, duration_seconds: float, succeeded: bool) -> None:
        """Record one checkpoint attempt at `step`."""
        self.checkpoint_duration.set(duration_seconds)
        if not succeeded:
            self.checkpoint_failures.inc()
            return
        self.checkpoints.inc()
        self.checkpoint_step.set(step)
        self.checkpoint_time.set(time.time())

    def record_resume(self, *, step: int, checkpoint_timestamp: float | None = None) -> None:
        """Record that this process resumed from the checkpoint of `step`.

        `checkpoint_timestamp` (Unix time the checkpoint was committed), when known, keeps
        the checkpoint age right across restarts; otherwise the resume time is used instead.
        """
        self.resumes.inc()
        self.resumed_from_step.set(step)
        self.checkpoint_step.set(step)
        self.checkpoint_time.set(checkpoint_timestamp if checkpoint_timestamp is not None else time.time())
        self.last_step.set(step)
        set_log_context(step=step)
