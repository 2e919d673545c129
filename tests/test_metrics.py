"""The per-worker Prometheus exporter: names, labels, values and the HTTP server, scraped for real."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from distill.config import MetricsConfig
from distill.metrics import TrainingMetrics, WorkerIdentity

PROMTOOL = shutil.which("promtool")
LABELS = {"experiment": "exp", "worker": "1", "slice": "2"}


def step_arguments(step: int, **overrides: float) -> dict:
    arguments = dict(
        step=step,
        loss=2.5,
        kl_loss=2.0,
        ce_loss=5.0,
        learning_rate=1e-3,
        grad_norm=0.75,
        tokens=480,
        padding_tokens=32,
        global_tokens=1920,
        step_seconds=0.5,
        data_wait_seconds=0.05,
    )
    arguments.update(overrides)
    return arguments


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def samples(body: str) -> dict[str, float]:
    """Return {sample name: value} for the series labelled with LABELS (plus `le` for buckets)."""
    values = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = dict(sample.labels)
            le = labels.pop("le", None)
            if labels != LABELS and not sample.name == "distill_info":
                continue
            name = sample.name if le is None else f"{sample.name}[{le}]"
            values[name] = sample.value
    return values


@pytest.fixture
def metrics():
    exporter = TrainingMetrics(MetricsConfig(host="127.0.0.1", port=0), WorkerIdentity("exp", 1, 2))
    exporter.start()
    yield exporter
    exporter.stop(final_scrape_timeout_seconds=0)


def test_exporter_binds_requested_host(metrics):
    assert metrics.port is not None
    assert metrics.port > 0


def test_exporter_disabled_returns_none():
    exporter = TrainingMetrics(MetricsConfig(enabled=False), WorkerIdentity("exp", 0, 0))
    assert exporter.start() is None
    exporter.stop()


def test_exporter_port_in_use_names_fix(metrics):
    clash = TrainingMetrics(MetricsConfig(host="127.0.0.1", port=metrics.port), WorkerIdentity("exp", 0, 0))
    with pytest.raises(OSError) as error:
        clash.start()
    assert f"127.0.0.1:{metrics.port}" in str(error.value)
    assert "metrics.port" in str(error.value)


def test_scraped_body_passes_promtool(metrics):
    if PROMTOOL is None:
        pytest.fail("promtool not found; install it with `sudo scripts/install-prometheus.sh`")
    metrics.set_info(num_slices=2, hosts_per_slice=4, accelerator="tpu-v4-podslice", tpu_type="v4-64", total_steps=100)
    metrics.set_flops_per_token(6e9, total_chips=32, peak_flops_per_chip=275e12)
    metrics.record_step(**step_arguments(1))
    metrics.record_checkpoint(step=1, duration_seconds=3.0, succeeded=True)
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=scrape(metrics.port), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""
    assert result.stderr.strip() == ""


def test_every_metric_has_help_and_prefix(metrics):
    metrics.record_step(**step_arguments(1))
    for family in text_string_to_metric_families(scrape(metrics.port)):
        assert family.name.startswith("distill_"), family.name
        assert family.documentation, f"{family.name} has no help text"


def test_every_series_has_identity_labels(metrics):
    metrics.set_info(num_slices=1, hosts_per_slice=1, accelerator="cpu")
    metrics.record_step(**step_arguments(1))
    metrics.record_checkpoint(step=1, duration_seconds=1.0, succeeded=True)
    for family in text_string_to_metric_families(scrape(metrics.port)):
        for sample in family.samples:
            for name, value in LABELS.items():
                assert sample.labels.get(name) == value, f"{sample.name} lacks {name}={value}"


def test_unknown_values_absent_before_first_step(metrics):
    values = samples(scrape(metrics.port))
    for name in ("distill_loss", "distill_grad_norm", "distill_mfu_ratio", "distill_chip_flops_per_second",
                 "distill_checkpoint_last_success_timestamp_seconds", "distill_total_steps", "distill_restart_attempt"):
        assert name not in values, f"{name} is exported before it is known"


def test_counters_start_at_zero(metrics):
    values = samples(scrape(metrics.port))
    for name in ("distill_tokens_total", "distill_steps_total", "distill_checkpoint_failures_total"):
        assert values[name] == 0.0


def test_step_values_exported(metrics):
    metrics.record_step(**step_arguments(7))
    values = samples(scrape(metrics.port))
    assert values["distill_loss"] == 2.5
    assert values["distill_kl_loss"] == 2.0
    assert values["distill_ce_loss"] == 5.0
    assert values["distill_learning_rate"] == 1e-3
    assert values["distill_grad_norm"] == 0.75
    assert values["distill_last_completed_step"] == 7
    assert values["distill_last_step_data_wait_seconds"] == 0.05


def test_token_counters_accumulate(metrics):
    for step in range(1, 4):
        metrics.record_step(**step_arguments(step))
    values = samples(scrape(metrics.port))
    assert values["distill_tokens_total"] == 3 * 480
    assert values["distill_padding_tokens_total"] == 3 * 32
    assert values["distill_steps_total"] == 3
    assert values["distill_data_wait_seconds_total"] == pytest.approx(3 * 0.05)


def test_step_histogram_counts_steps(metrics):
    metrics.record_step(**step_arguments(1, step_seconds=0.2))
    metrics.record_step(**step_arguments(2, step_seconds=4.0))
    values = samples(scrape(metrics.port))
    assert values["distill_step_duration_seconds_count"] == 2
    assert values["distill_step_duration_seconds_sum"] == pytest.approx(4.2)
    assert values["distill_step_duration_seconds_bucket[0.25]"] == 1
    assert values["distill_step_duration_seconds_bucket[5.0]"] == 2


def test_tokens_per_second_over_window():
    exporter = TrainingMetrics(
        MetricsConfig(host="127.0.0.1", port=0), WorkerIdentity("exp", 1, 2), throughput_window_steps=2
    )
    exporter.start()
    exporter.record_step(**step_arguments(1, tokens=100, global_tokens=400, step_seconds=10.0))
    exporter.record_step(**step_arguments(2, tokens=300, global_tokens=1200, step_seconds=1.0))
    exporter.record_step(**step_arguments(3, tokens=100, global_tokens=400, step_seconds=1.0))
    values = samples(scrape(exporter.port))
    exporter.stop(final_scrape_timeout_seconds=0)
    # The window keeps the last 2 steps: (300 + 100) tokens in 2 s.
    assert values["distill_worker_tokens_per_second"] == 200.0
    assert values["distill_job_tokens_per_second"] == 800.0


def test_window_rejects_zero_steps():
    with pytest.raises(ValueError, match="throughput_window_steps=0"):
        TrainingMetrics(MetricsConfig(enabled=False), WorkerIdentity("exp", 0, 0), throughput_window_steps=0)


def test_mfu_from_flops_model(metrics):
    metrics.set_flops_per_token(1e9, total_chips=4, peak_flops_per_chip=100e9)
    metrics.record_step(**step_arguments(1, global_tokens=200, step_seconds=1.0))
    values = samples(scrape(metrics.port))
    # 1e9 FLOPs/token * 200 tokens/s / 4 chips = 50 GFLOP/s per chip, half of the 100 GFLOP/s peak.
    assert values["distill_chip_flops_per_second"] == pytest.approx(50e9)
    assert values["distill_peak_chip_flops_per_second"] == pytest.approx(100e9)
    assert values["distill_mfu_ratio"] == pytest.approx(0.5)


def test_mfu_absent_without_peak(metrics):
    metrics.set_flops_per_token(1e9, total_chips=1, peak_flops_per_chip=None)
    metrics.record_step(**step_arguments(1))
    values = samples(scrape(metrics.port))
    assert "distill_chip_flops_per_second" in values
    assert "distill_mfu_ratio" not in values
    assert "distill_peak_chip_flops_per_second" not in values


def test_flops_per_token_rejects_zero(metrics):
    with pytest.raises(ValueError, match="flops_per_token=0"):
        metrics.set_flops_per_token(0, total_chips=1, peak_flops_per_chip=None)


def test_checkpoint_success_and_failure(metrics):
    before = time.time()
    metrics.record_checkpoint(step=100, duration_seconds=12.5, succeeded=True)
    metrics.record_checkpoint(step=200, duration_seconds=3.0, succeeded=False)
    values = samples(scrape(metrics.port))
    assert values["distill_checkpoint_last_success_step"] == 100
    assert values["distill_checkpoint_last_success_timestamp_seconds"] >= before
    assert values["distill_checkpoint_duration_seconds"] == 3.0
    assert values["distill_checkpoints_total"] == 1
    assert values["distill_checkpoint_failures_total"] == 1


def test_resume_sets_checkpoint_and_step(metrics):
    metrics.record_resume(step=300, checkpoint_timestamp=1_000.0)
    values = samples(scrape(metrics.port))
    assert values["distill_resumes_total"] == 1
    assert values["distill_resumed_from_step"] == 300
    assert values["distill_last_completed_step"] == 300
    assert values["distill_checkpoint_last_success_timestamp_seconds"] == 1_000.0


def test_info_labels(metrics):
    metrics.set_info(num_slices=2, hosts_per_slice=8, accelerator="tpu-v4-podslice", tpu_type="v4-64", restart_attempt=1)
    body = scrape(metrics.port)
    info = [
        sample for family in text_string_to_metric_families(body) for sample in family.samples
        if sample.name == "distill_info"
    ]
    assert len(info) == 1
    labels = info[0].labels
    assert labels["hosts"] == "16"
    assert labels["slices"] == "2"
    assert labels["accelerator"] == "tpu-v4-podslice"
    assert labels["tpu_type"] == "v4-64"
    assert labels["version"]
    values = samples(body)
    assert values["distill_expected_workers"] == 16
    assert values["distill_restart_attempt"] == 1


def test_heartbeat_moves_each_step(metrics):
    first = samples(scrape(metrics.port))["distill_heartbeat_timestamp_seconds"]
    time.sleep(0.01)
    metrics.record_step(**step_arguments(1))
    second = samples(scrape(metrics.port))["distill_heartbeat_timestamp_seconds"]
    assert second > first


def test_wait_for_scrape_after_call(metrics):
    scraper = threading.Timer(0.2, scrape, args=(metrics.port,))
    scraper.start()
    started = time.monotonic()
    assert metrics.wait_for_scrape(5.0)
    assert time.monotonic() - started >= 0.15
    scraper.join()


def test_wait_for_scrape_times_out(metrics):
    started = time.monotonic()
    assert not metrics.wait_for_scrape(0.2)
    assert time.monotonic() - started >= 0.2


def test_record_step_is_cheap():
    exporter = TrainingMetrics(MetricsConfig(enabled=False), WorkerIdentity("exp", 0, 0))
    exporter.set_flops_per_token(1e9, total_chips=1, peak_flops_per_chip=1e12)
    arguments = step_arguments(1)
    count = 5_000
    started = time.perf_counter()
    for _ in range(count):
        exporter.record_step(**arguments)
    per_call = (time.perf_counter() - started) / count
    # 1 ms is 1% of a 100 ms step, the fastest steps a real accelerator run takes; the
    # measured cost is about 10 microseconds (bench/metrics_overhead.py measures the effect).
    assert per_call < 1e-3


def test_no_created_series(metrics):
    metrics.record_step(**step_arguments(1))
    assert "_created" not in scrape(metrics.port)
