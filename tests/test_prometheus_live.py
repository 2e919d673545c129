"""Debian's Prometheus scrapes real workers; its HTTP API must agree with what the trainer did.

Two runs, each with its own Prometheus on 127.0.0.1 (scrape every 250 ms, a temporary data
folder, the chart's alert rules evaluated every second), stopped at the end:

* a real `distill train` of a 2-layer student on the demo teacher, whose token counter and
  loss gauge must equal the trainer's own records (summary.json, history.jsonl and the
  progress log lines) at every scraped step, and which must fill every dashboard panel
  except MFU, whose peak is unknown on CPU;
* a scripted worker that drives the exporter through its whole API with a TPU type, so MFU
  is known, and then injects a NaN loss, a failed checkpoint and a missing worker, which the
  matching alert expressions must report.

Two scripted workers of one experiment then check that per-worker series do not clash and
that token counters add up across workers.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config, write_config
from helm_render import find, render

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "helm" / "distill" / "files" / "dashboard.json"
NAMESPACE = "ml"  # helm_render renders into this namespace; the scrape config adds it as a label
SCRAPE_INTERVAL = "250ms"
STEP_LINE = re.compile(r"step (\d+)/(\d+) loss=([0-9.]+) ")

pytestmark = pytest.mark.slow

# Metrics that need the accelerator's peak FLOP/s, which a CPU run does not have.
PEAK_METRICS = ("distill_mfu_ratio", "distill_peak_chip_flops_per_second")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dashboard_targets() -> list[tuple[str, str]]:
    """Return (panel title and refId, PromQL) for every query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (f"{panel['title']} {target['refId']}", target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


class Prometheus:
    """A Prometheus server process on 127.0.0.1 with a temporary data folder."""

    def __init__(self, directory: Path, target_ports: int | list[int], experiment: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus not found; install it with `sudo scripts/install-prometheus.sh`")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

        rules = directory / "rules.yml"
        rules.write_text(yaml.safe_dump({"groups": alert_groups(experiment)}))

        ports = target_ports if isinstance(target_ports, list) else [target_ports]
        targets = [f"127.0.0.1:{port}" for port in ports]
        config = directory / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL, "evaluation_interval": "1s"},
                    "rule_files": [str(rules)],
                    "scrape_configs": [
                        {
                            "job_name": "distill",
                            "static_configs": [{"targets": targets, "labels": {"namespace": NAMESPACE}}],
                        }
                    ],
                }
            )
        )

        self.log_path = directory / "prometheus.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        for _ in range(100):
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        pytest.fail(f"prometheus not ready after 10 s: {self.log_path.read_text()[-2000:]}")

    def api(self, path: str, **parameters: str) -> dict:
        query = urllib.parse.urlencode(parameters)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as response:
                payload = json.load(response)
        except urllib.error.HTTPError as error:
            # Prometheus returns status 400 and a JSON error body for an invalid query.
            payload = json.load(error)
        return payload

    def query(self, expression: str, at: float) -> list[dict]:
        """Evaluate `expression` at Unix time `at`; fail the test on a query error."""
        payload = self.api("query", query=expression, time=f"{at:.3f}")
        assert payload["status"] == "success", f"{expression}: {payload.get('error')}"
        return payload["data"]["result"]

    def samples(self, metric: str, window_seconds: int = 600) -> list[tuple[float, float]]:
        """Return the raw (timestamp, value) samples of one series scraped in the last window."""
        result = self.query(f"{metric}[{window_seconds}s]", time.time())
        assert len(result) == 1, f"{metric}: expected one series, got {len(result)}"
        return [(float(stamp), float(value)) for stamp, value in result[0]["values"]]

    def wait_for_value(self, expression: str, expected: float, timeout: float = 10.0) -> float:
        """Poll until `expression` has one series equal to `expected`; return the query time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = time.time()
            result = self.query(expression, now)
            if len(result) == 1 and float(result[0]["value"][1]) == expected:
                return now
            time.sleep(0.1)
        pytest.fail(f"{expression} did not reach {expected} within {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


def alert_groups(experiment: str) -> list[dict]:
    """The chart's alert rules for `experiment`, evaluated every second."""
    values = {
        "config": {"experiment": {"name": experiment}},
        "monitoring": {"prometheusRule": {"enabled": True}, "alerts": {"evaluationInterval": "1s"}},
    }
    return find(render(values=values), "PrometheusRule")["spec"]["groups"]


def substitute(expression: str, experiment: str, range_seconds: int) -> str:
    """Fill in the dashboard variables the way Grafana would for this run."""
    return (
        expression.replace("$namespace", NAMESPACE)
        .replace("$experiment", experiment)
        .replace("$__rate_interval", f"{range_seconds}s")
        .replace("$__range", f"{range_seconds}s")
    )


def values_of(result: list[dict]) -> list[float]:
    return [float(item["value"][1]) for item in result]


# --- A real distillation run -----------------------------------------------------------


def live_config(assets: Path, save_directory: Path, experiment: str, port: int, steps: int = 12) -> dict:
    return tiny_config(
        save_directory,
        experiment={"name": experiment},
        training={"max_training_steps": steps, "save_interval_steps": steps // 2},
        metrics={"host": "127.0.0.1", "port": port},
        # Scoring held-out text after the last step keeps the exporter up for a few more scrapes.
        evaluation={
            "sources": [{"type": "jsonl", "path": str(assets / "kjv" / "heldout.jsonl"), "content_field": "text"}],
            "num_sequences": 4,
            "batch_size": 2,
            "include_teacher": False,
        },
    )


def run_environment(directory: Path, **layout: str) -> dict[str, str]:
    """Environment of one `distill train` process; `layout` adds DISTILL_* variables as the chart sets them."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("DISTILL_")}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "JAX_PLATFORMS": "cpu",
            "DISTILL_CACHE_DIR": str(directory / "cache"),
            # The chart passes JobSet's restart attempt; this is the first attempt.
            "DISTILL_RESTART_ATTEMPT": "0",
        }
    )
    env.update(layout)
    return env


def read_records(save_directory: Path) -> tuple[dict, dict[int, dict]]:
    """Return the run's summary.json and its history.jsonl keyed by step."""
    summary = json.loads((save_directory / "summary.json").read_text())
    history = {}
    for line in (save_directory / "history.jsonl").read_text().splitlines():
        record = json.loads(line)
        history[record["step"]] = record
    return summary, history


@dataclass
class LiveRun:
    prometheus: Prometheus
    experiment: str
    summary: dict
    history: dict[int, dict]
    logged_losses: dict[int, float]
    final_time: float
    first_time: float


@pytest.fixture(scope="module")
def live_run(assets, tmp_path_factory):
    directory = tmp_path_factory.mktemp("live")
    experiment = "live"
    port = free_port()
    config = live_config(assets, directory / "run", experiment, port)
    config_path = write_config(directory / "config.yaml", config)
    prometheus = Prometheus(directory, port, experiment)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "distill", "train", str(config_path)],
            capture_output=True,
            text=True,
            timeout=600,
            env=run_environment(directory),
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        # Let Prometheus notice the target is gone and finish writing its last scrape.
        time.sleep(1.0)

        summary, history = read_records(Path(config["training"]["save_directory"]))
        logged = {int(match[1]): float(match[3]) for match in STEP_LINE.finditer(output)}

        steps = prometheus.samples(f'distill_last_completed_step{{experiment="{experiment}"}}')
        yield LiveRun(
            prometheus=prometheus,
            experiment=experiment,
            summary=summary,
            history=history,
            logged_losses=logged,
            final_time=steps[-1][0],
            first_time=steps[0][0],
        )
    finally:
        prometheus.stop()


def scraped_by_step(run: LiveRun, metric: str, worker: int = 0) -> dict[int, float]:
    """Return {step: value of `metric`} of one worker, from scrapes taken after a completed step."""
    selector = f'{{experiment="{run.experiment}", worker="{worker}"}}'
    steps = dict(run.prometheus.samples(f"distill_last_completed_step{selector}"))
    values = dict(run.prometheus.samples(f"{metric}{selector}"))
    return {int(step): values[stamp] for stamp, step in steps.items() if stamp in values and step > 0}


def test_live_final_step_scraped(live_run):
    scraped = scraped_by_step(live_run, "distill_loss")
    assert max(scraped) == live_run.summary["steps"], (
        "Prometheus never scraped the final step; the exporter must stay up until one scrape "
        "after the last step (TrainingMetrics.stop(final_scrape_timeout_seconds=...))"
    )


def test_live_tokens_counter_equals_summary(live_run):
    tokens = scraped_by_step(live_run, "distill_tokens_total")
    assert tokens[live_run.summary["steps"]] == live_run.summary["tokens"]


def test_live_tokens_counter_equals_history(live_run):
    tokens = scraped_by_step(live_run, "distill_tokens_total")
    for step, value in tokens.items():
        assert value == live_run.history[step]["tokens"], f"step {step}"


def test_live_padding_counter_equals_summary(live_run):
    padding = scraped_by_step(live_run, "distill_padding_tokens_total")
    assert padding[live_run.summary["steps"]] == live_run.summary["padding_tokens"]


def test_live_loss_equals_history(live_run):
    losses = scraped_by_step(live_run, "distill_loss")
    for step, value in losses.items():
        assert value == live_run.history[step]["loss"], f"step {step}"


def test_live_loss_equals_logged_line(live_run):
    losses = scraped_by_step(live_run, "distill_loss")
    for step, value in losses.items():
        # Progress lines print the loss with 4 decimals.
        assert abs(value - live_run.logged_losses[step]) <= 0.5e-4, f"step {step}"


def test_live_final_loss_equals_summary(live_run):
    losses = scraped_by_step(live_run, "distill_loss")
    assert losses[live_run.summary["steps"]] == live_run.summary["final_loss"]


def test_live_checkpoint_step_scraped(live_run):
    checkpoint = scraped_by_step(live_run, "distill_checkpoint_last_success_step")
    assert checkpoint[live_run.summary["steps"]] == live_run.summary["steps"]


@pytest.mark.parametrize(("name", "expression"), dashboard_targets(), ids=[name for name, _ in dashboard_targets()])
def test_live_dashboard_query(live_run, name, expression):
    range_seconds = math.ceil(live_run.final_time - live_run.first_time) + 5
    result = live_run.prometheus.query(substitute(expression, live_run.experiment, range_seconds), live_run.final_time)
    if any(metric in expression for metric in PEAK_METRICS):
        assert result == [], f"{name}: a CPU run has no peak FLOP/s, so MFU must be absent"
        return
    assert result, f"{name}: no data"
    for value in values_of(result):
        assert math.isfinite(value), f"{name}: {value}"


def test_live_dashboard_variables(live_run):
    namespaces = live_run.prometheus.api("label/namespace/values", **{"match[]": "distill_start_time_seconds"})
    assert NAMESPACE in namespaces["data"]
    experiments = live_run.prometheus.api(
        "label/experiment/values", **{"match[]": f'distill_start_time_seconds{{namespace="{NAMESPACE}"}}'}
    )
    assert live_run.experiment in experiments["data"]


def test_live_alert_rules_healthy(live_run):
    groups = live_run.prometheus.api("rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 6
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        assert rule.get("lastError", "") == "", rule["name"]


def test_live_healthy_run_raises_no_alert(live_run):
    for rule in alert_groups(live_run.experiment)[0]["rules"]:
        assert live_run.prometheus.query(rule["expr"], live_run.final_time) == [], rule["alert"]


# --- A real two-worker run -------------------------------------------------------------


@pytest.fixture(scope="module")
def two_worker_run(assets, random_teacher, tmp_path_factory):
    """Two `distill train` processes forming one JAX runtime, as two pods of one slice."""
    directory = tmp_path_factory.mktemp("two-workers")
    experiment = "pair"
    ports = [free_port(), free_port()]
    coordinator = f"127.0.0.1:{free_port()}"
    prometheus = Prometheus(directory, ports, experiment)
    processes = []
    try:
        for worker, port in enumerate(ports):
            config = live_config(assets, directory / "run", experiment, port, steps=8)
            config["teacher"] = {"path": str(random_teacher), "dtype": "float32"}
            config["student"].update({"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32})
            config["data"]["sequence_length"] = 32
            config["training"]["total_batch_size"] = 4
            config["training"]["schedule"] = "cosine"
            config_path = write_config(directory / f"config-{worker}.yaml", config)
            # Each worker gets its own compile cache, as each pod has its own cache volume.
            env = run_environment(
                directory / f"worker-{worker}",
                DISTILL_WORKER_INDEX=str(worker),
                DISTILL_SLICE_INDEX="0",
                DISTILL_NUM_SLICES="1",
                DISTILL_HOSTS_PER_SLICE="2",
                DISTILL_ACCELERATOR="cpu",
                DISTILL_TPU_TYPE="",
                DISTILL_COORDINATOR_ADDRESS=coordinator,
            )
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "distill", "train", str(config_path)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=env,
                )
            )
        outputs = [process.communicate(timeout=600)[0] for process in processes]
        for worker, (process, output) in enumerate(zip(processes, outputs)):
            assert process.returncode == 0, f"worker {worker}:\n{output[-4000:]}"
        time.sleep(1.0)

        summary, history = read_records(Path(config["training"]["save_directory"]))
        final_times = [
            prometheus.samples(f'distill_last_completed_step{{experiment="{experiment}", worker="{worker}"}}')[-1][0]
            for worker in (0, 1)
        ]
        first_time = prometheus.samples(f'distill_start_time_seconds{{experiment="{experiment}", worker="0"}}')[0][0]
        yield LiveRun(
            prometheus=prometheus,
            experiment=experiment,
            summary=summary,
            history=history,
            logged_losses={},
            # The last moment at which both workers were still scraped.
            final_time=min(final_times),
            first_time=first_time,
        )
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        prometheus.stop()


def test_two_workers_have_own_series(two_worker_run):
    result = two_worker_run.prometheus.query(
        f'distill_tokens_total{{experiment="{two_worker_run.experiment}"}}', two_worker_run.final_time
    )
    assert sorted(item["metric"]["worker"] for item in result) == ["0", "1"]


def test_two_workers_tokens_add_up(two_worker_run):
    steps = two_worker_run.summary["steps"]
    per_worker = [scraped_by_step(two_worker_run, "distill_tokens_total", worker)[steps] for worker in (0, 1)]
    assert sum(per_worker) == two_worker_run.summary["tokens"]
    assert all(value > 0 for value in per_worker)


def test_two_workers_same_global_loss(two_worker_run):
    for worker in (0, 1):
        for step, value in scraped_by_step(two_worker_run, "distill_loss", worker).items():
            assert value == two_worker_run.history[step]["loss"], f"worker {worker} step {step}"


def test_two_workers_dashboard_per_worker(two_worker_run):
    expression = dict(dashboard_targets())["Tokens/s per worker A"]
    range_seconds = math.ceil(two_worker_run.final_time - two_worker_run.first_time) + 5
    result = two_worker_run.prometheus.query(
        substitute(expression, two_worker_run.experiment, range_seconds), two_worker_run.final_time
    )
    assert sorted(item["metric"]["worker"] for item in result) == ["0", "1"]


def test_two_workers_counted_as_expected(two_worker_run):
    targets = dict(dashboard_targets())
    at = two_worker_run.final_time
    scraped = two_worker_run.prometheus.query(substitute(targets["Workers scraped A"], two_worker_run.experiment, 60), at)
    expected = two_worker_run.prometheus.query(substitute(targets["Workers scraped B"], two_worker_run.experiment, 60), at)
    assert values_of(scraped) == [2.0]
    assert values_of(expected) == [2.0]


def test_two_workers_no_missing_alert(two_worker_run):
    expression = alert_expression(two_worker_run.experiment, "DistillWorkerMissing")
    assert two_worker_run.prometheus.query(expression, two_worker_run.final_time) == []


# --- A scripted worker that uses the whole exporter API --------------------------------


@dataclass
class ScriptedRun:
    prometheus: Prometheus
    experiment: str
    final_time: float
    first_time: float
    tokens: int
    expected_mfu: float


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    from distill.config import MetricsConfig
    from distill.flops import ModelShape, peak_flops_per_chip, training_flops_per_token
    from distill.metrics import TrainingMetrics, WorkerIdentity
    from distill.topology import lookup

    directory = tmp_path_factory.mktemp("scripted")
    experiment = "scripted"
    port = free_port()
    prometheus = Prometheus(directory, port, experiment)
    metrics = TrainingMetrics(MetricsConfig(host="127.0.0.1", port=port), WorkerIdentity(experiment, 0, 0))
    try:
        metrics.start()
        slice_shape = lookup("v4-8")
        metrics.set_info(num_slices=1, hosts_per_slice=slice_shape.hosts, accelerator=slice_shape.accelerator,
                         tpu_type="v4-8", total_steps=40, restart_attempt=0)
        teacher = ModelShape(40, 5120, 17408, 40, 8, 128, 151936)
        student = ModelShape(28, 1024, 3072, 16, 8, 128, 151936)
        flops_per_token = training_flops_per_token(teacher, student, 2048)
        metrics.set_flops_per_token(
            flops_per_token, total_chips=slice_shape.chips, peak_flops_per_chip=peak_flops_per_chip("v4-8")
        )
        # Reported step time 2 s (the loop sleeps far less): 4096 tokens / 2 s on 4 chips.
        expected_mfu = flops_per_token * 4096 / 2.0 / slice_shape.chips / peak_flops_per_chip("v4-8")
        metrics.record_resume(step=10)
        # Prometheus discovers the target a moment after it starts; step only once it scrapes.
        assert metrics.wait_for_scrape(30)
        tokens = 0
        for step in range(11, 41):
            metrics.record_step(
                step=step, loss=3.0 - step / 100, kl_loss=2.0, ce_loss=4.0, learning_rate=1e-4, grad_norm=0.5,
                tokens=4096, padding_tokens=0, global_tokens=4096, step_seconds=2.0, data_wait_seconds=0.2,
            )
            tokens += 4096
            if step % 10 == 0:
                metrics.record_checkpoint(step=step, duration_seconds=0.2, succeeded=True)
            time.sleep(0.05)
        final_time = prometheus.wait_for_value(f'distill_last_completed_step{{experiment="{experiment}"}}', 40.0)
        first_time = prometheus.samples(f'distill_start_time_seconds{{experiment="{experiment}"}}')[0][0]
        yield ScriptedRun(prometheus, experiment, final_time, first_time, tokens, expected_mfu)
    finally:
        metrics.stop(final_scrape_timeout_seconds=0)
        prometheus.stop()


@pytest.mark.parametrize(("name", "expression"), dashboard_targets(), ids=[name for name, _ in dashboard_targets()])
def test_scripted_dashboard_query(scripted_run, name, expression):
    range_seconds = math.ceil(scripted_run.final_time - scripted_run.first_time) + 5
    expression = substitute(expression, scripted_run.experiment, range_seconds)
    result = scripted_run.prometheus.query(expression, scripted_run.final_time)
    assert result, f"{name}: no data"
    for value in values_of(result):
        assert math.isfinite(value), f"{name}: {value}"


def test_scripted_mfu_from_flops_model(scripted_run):
    result = scripted_run.prometheus.query(
        f'distill_mfu_ratio{{experiment="{scripted_run.experiment}"}}', scripted_run.final_time
    )
    assert len(result) == 1
    assert float(result[0]["value"][1]) == pytest.approx(scripted_run.expected_mfu, rel=1e-12)
    assert 0 < scripted_run.expected_mfu < 1


def test_scripted_tokens_counter(scripted_run):
    result = scripted_run.prometheus.query(
        f'distill_tokens_total{{experiment="{scripted_run.experiment}"}}', scripted_run.final_time
    )
    assert float(result[0]["value"][1]) == scripted_run.tokens


def alert_expression(experiment: str, name: str) -> str:
    return next(rule["expr"] for rule in alert_groups(experiment)[0]["rules"] if rule["alert"] == name)


def test_broken_worker_raises_alerts(tmp_path):
    from distill.config import MetricsConfig
    from distill.metrics import TrainingMetrics, WorkerIdentity

    experiment = "broken"
    port = free_port()
    prometheus = Prometheus(tmp_path, port, experiment)
    worker = TrainingMetrics(MetricsConfig(host="127.0.0.1", port=port), WorkerIdentity(experiment, 1, 0))
    try:
        worker.start()
        # Worker 1 of a two-host slice; worker 0 never shows up.
        worker.set_info(num_slices=1, hosts_per_slice=2, accelerator="tpu-v4-podslice", tpu_type="v4-16", total_steps=40)
        # One scrape with the failure counter at 0, so increase() counts the failure below.
        assert worker.wait_for_scrape(10)
        worker.record_step(
            step=1, loss=float("nan"), kl_loss=float("nan"), ce_loss=4.0, learning_rate=1e-4, grad_norm=0.5,
            tokens=4096, padding_tokens=0, global_tokens=8192, step_seconds=0.05, data_wait_seconds=0.0,
        )
        worker.record_checkpoint(step=1, duration_seconds=0.1, succeeded=False)
        prometheus.wait_for_value(f'distill_checkpoint_failures_total{{experiment="{experiment}"}}', 1.0)
        now = time.time()
        nan_alert = prometheus.query(alert_expression(experiment, "DistillLossNotFinite"), now)
        failed_alert = prometheus.query(alert_expression(experiment, "DistillCheckpointFailed"), now)
        missing_alert = prometheus.query(alert_expression(experiment, "DistillWorkerMissing"), now)
        stalled_alert = prometheus.query(alert_expression(experiment, "DistillTrainingStalled"), now)
    finally:
        worker.stop(final_scrape_timeout_seconds=0)
        prometheus.stop()
    assert len(nan_alert) == 1
    assert len(failed_alert) == 1
    assert values_of(missing_alert) == [1.0]
    assert stalled_alert == []


@pytest.fixture(scope="module")
def scripted_pair(tmp_path_factory):
    """Two exporters of one experiment (workers 0 and 1 of a v4-16 slice) scraped by one Prometheus."""
    from distill.config import MetricsConfig
    from distill.metrics import TrainingMetrics, WorkerIdentity

    directory = tmp_path_factory.mktemp("pair")
    experiment = "pair"
    ports = [free_port(), free_port()]
    prometheus = Prometheus(directory, ports, experiment)
    workers = [
        TrainingMetrics(MetricsConfig(host="127.0.0.1", port=port), WorkerIdentity(experiment, index, 0))
        for index, port in enumerate(ports)
    ]
    try:
        for worker in workers:
            worker.start()
            worker.set_info(num_slices=1, hosts_per_slice=2, accelerator="tpu", tpu_type="v4-16", total_steps=100)
        for worker in workers:
            assert worker.wait_for_scrape(30)
        # Uneven shares of each global batch: worker 0 gets 3000 tokens, worker 1 gets 1000.
        for step in range(1, 11):
            for index, worker in enumerate(workers):
                worker.record_step(
                    step=step, loss=2.0 - step / 100, kl_loss=1.5, ce_loss=3.0, learning_rate=1e-4, grad_norm=0.5,
                    tokens=3000 if index == 0 else 1000, padding_tokens=0, global_tokens=4000, step_seconds=1.0,
                    data_wait_seconds=0.0,
                )
            time.sleep(0.1)
        final_time = prometheus.wait_for_value(
            f'sum(distill_tokens_total{{experiment="{experiment}"}})', 40_000.0
        )
        first_time = prometheus.samples(f'distill_start_time_seconds{{experiment="{experiment}", worker="0"}}')[0][0]
        yield ScriptedRun(prometheus, experiment, final_time, first_time, tokens=40_000, expected_mfu=0.0)
    finally:
        for worker in workers:
            worker.stop(final_scrape_timeout_seconds=0)
        prometheus.stop()


def test_pair_series_do_not_clash(scripted_pair):
    result = scripted_pair.prometheus.query(
        f'distill_loss{{experiment="{scripted_pair.experiment}"}}', scripted_pair.final_time
    )
    assert sorted(item["metric"]["worker"] for item in result) == ["0", "1"]


def test_pair_tokens_add_up(scripted_pair):
    result = scripted_pair.prometheus.query(
        f'sum by (experiment) (distill_tokens_total{{experiment="{scripted_pair.experiment}"}})', scripted_pair.final_time
    )
    assert values_of(result) == [scripted_pair.tokens]


def test_pair_global_loss_identical(scripted_pair):
    result = scripted_pair.prometheus.query(
        f'distill_loss{{experiment="{scripted_pair.experiment}"}}', scripted_pair.final_time
    )
    assert len(set(values_of(result))) == 1


def test_pair_dashboard_per_worker_rates(scripted_pair):
    expression = dict(dashboard_targets())["Tokens/s per worker A"]
    range_seconds = math.ceil(scripted_pair.final_time - scripted_pair.first_time) + 5
    result = scripted_pair.prometheus.query(
        substitute(expression, scripted_pair.experiment, range_seconds), scripted_pair.final_time
    )
    rates = {item["metric"]["worker"]: float(item["value"][1]) for item in result}
    assert sorted(rates) == ["0", "1"]
    # Worker 0 consumed three times the tokens of worker 1. The two targets are scraped at
    # different moments, so rate() extrapolates each differently by up to a few percent.
    assert rates["0"] == pytest.approx(3 * rates["1"], rel=0.1)


def test_pair_workers_counted(scripted_pair):
    targets = dict(dashboard_targets())
    scraped = scripted_pair.prometheus.query(
        substitute(targets["Workers scraped A"], scripted_pair.experiment, 60), scripted_pair.final_time
    )
    expected = scripted_pair.prometheus.query(
        substitute(targets["Workers scraped B"], scripted_pair.experiment, 60), scripted_pair.final_time
    )
    assert values_of(scraped) == [2.0]
    assert values_of(expected) == [2.0]


def test_pair_no_worker_missing_alert(scripted_pair):
    expression = alert_expression(scripted_pair.experiment, "DistillWorkerMissing")
    assert scripted_pair.prometheus.query(expression, scripted_pair.final_time) == []
