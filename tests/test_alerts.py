"""Alert rules of the chart, rendered by the real helm and unit-tested with `promtool test rules`.

Each case feeds synthetic series of one worker layout to the rules exactly as the chart
renders them (default thresholds: stall 1800 s, throughput below 0.5 of the 2 h rate for
15 m, checkpoint overdue after 7200 s, workers missing for 5 m) and states which alerts
must fire, or that none may, at one evaluation time.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from helm_render import find, render

PROMTOOL = shutil.which("promtool") or "promtool-not-installed"

NAMESPACE = "ml"  # helm_render.template renders into this namespace
EXPERIMENT = "exp"  # and with this release name, which is the default experiment name
ALERT_VALUES = {"monitoring": {"prometheusRule": {"enabled": True}, "gmpRules": {"enabled": True}}}


def series(name: str, values: str, worker: int = 0, experiment: str = EXPERIMENT) -> dict[str, str]:
    labels = f'namespace="{NAMESPACE}", experiment="{experiment}", slice="0", worker="{worker}"'
    return {"series": f"{name}{{{labels}}}", "values": values}


def alert(severity: str) -> dict:
    return {"exp_labels": {"severity": severity, "namespace": NAMESPACE, "experiment": EXPERIMENT}}


@pytest.fixture(scope="module", autouse=True)
def require_promtool():
    if shutil.which("promtool") is None:
        pytest.fail("promtool not found; install it with `sudo scripts/install-prometheus.sh`")


@pytest.fixture(scope="module")
def groups() -> list[dict]:
    return find(render(values=ALERT_VALUES), "PrometheusRule")["spec"]["groups"]


@pytest.fixture(scope="module")
def rule_file(groups, tmp_path_factory) -> Path:
    """The rendered rules without annotations; annotation templates are checked separately."""
    stripped = copy.deepcopy(groups)
    for group in stripped:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    path = tmp_path_factory.mktemp("rules") / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": stripped}))
    return path


def promtool_test(rule_file: Path, input_series: list[dict], alert_name: str, eval_time: str, expected: list[dict]):
    test_file = rule_file.parent / f"test-{alert_name}.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [rule_file.name],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": input_series,
                        "alert_rule_test": [{"eval_time": eval_time, "alertname": alert_name, "exp_alerts": expected}],
                    }
                ],
            }
        )
    )
    result = subprocess.run(
        [PROMTOOL, "test", "rules", test_file.name], cwd=rule_file.parent, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_file_passes_promtool_check(groups, tmp_path):
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_gmp_rules_match_prometheus_rule():
    objects = render(values=ALERT_VALUES)
    assert find(objects, "Rules")["spec"]["groups"] == find(objects, "PrometheusRule")["spec"]["groups"]


def test_every_alert_has_severity_and_summary(groups):
    for rule in groups[0]["rules"]:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]


def test_selectors_scoped_to_experiment(groups):
    for rule in groups[0]["rules"]:
        assert f'namespace="{NAMESPACE}", experiment="{EXPERIMENT}"' in rule["expr"], rule["alert"]


def test_thresholds_from_values():
    values = copy.deepcopy(ALERT_VALUES)
    values["monitoring"]["alerts"] = {"stalledAfterSeconds": 600, "throughputFor": "30m"}
    rules = {rule["alert"]: rule for rule in find(render(values=values), "PrometheusRule")["spec"]["groups"][0]["rules"]}
    assert rules["DistillTrainingStalled"]["expr"].endswith("> 600")
    assert rules["DistillThroughputLow"]["for"] == "30m"


def test_stalled_annotation_rendered(groups, tmp_path):
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    heartbeat = series("distill_heartbeat_timestamp_seconds", "0+60x40 2400x40")
    expected = alert("critical")
    # At 71 minutes the last heartbeat (40 minutes) is 1860 s old.
    expected["exp_annotations"] = {
        "summary": "Distillation exp has completed no step for 31m 0s",
        "description": groups[0]["rules"][0]["annotations"]["description"].replace(
            "{{ $labels.experiment }}", EXPERIMENT
        ).replace("{{ $labels.namespace }}", NAMESPACE),
    }
    promtool_test(path, [heartbeat], "DistillTrainingStalled", "71m", [expected])


def test_stalled_fires_after_threshold(rule_file):
    heartbeat = series("distill_heartbeat_timestamp_seconds", "0+60x40 2400x40")
    promtool_test(rule_file, [heartbeat], "DistillTrainingStalled", "71m", [alert("critical")])


def test_stalled_quiet_before_threshold(rule_file):
    heartbeat = series("distill_heartbeat_timestamp_seconds", "0+60x40 2400x40")
    promtool_test(rule_file, [heartbeat], "DistillTrainingStalled", "69m", [])


def test_stalled_quiet_while_stepping(rule_file):
    heartbeat = series("distill_heartbeat_timestamp_seconds", "0+60x100")
    promtool_test(rule_file, [heartbeat], "DistillTrainingStalled", "90m", [])


def test_stalled_ignores_other_experiment(rule_file):
    heartbeat = series("distill_heartbeat_timestamp_seconds", "0+60x40 2400x40", experiment="other")
    promtool_test(rule_file, [heartbeat], "DistillTrainingStalled", "71m", [])


def test_loss_nan_fires(rule_file):
    loss = series("distill_loss", "3 2.5 NaN NaN")
    promtool_test(rule_file, [loss], "DistillLossNotFinite", "3m", [alert("critical")])


def test_loss_infinite_fires(rule_file):
    loss = series("distill_loss", "3 2.5 +Inf +Inf")
    promtool_test(rule_file, [loss], "DistillLossNotFinite", "3m", [alert("critical")])


def test_loss_finite_quiet(rule_file):
    loss = series("distill_loss", "3 2.5 2.4 2.3")
    promtool_test(rule_file, [loss], "DistillLossNotFinite", "3m", [])


def test_throughput_drop_fires(rule_file):
    # Two workers at 1000 tokens/min each for 3 h, then 200 tokens/min each.
    tokens = [series("distill_tokens_total", "0+1000x180 180000+200x60", worker=worker) for worker in (0, 1)]
    promtool_test(rule_file, tokens, "DistillThroughputLow", "210m", [alert("warning")])


def test_throughput_drop_waits_for_duration(rule_file):
    tokens = [series("distill_tokens_total", "0+1000x180 180000+200x60", worker=worker) for worker in (0, 1)]
    promtool_test(rule_file, tokens, "DistillThroughputLow", "190m", [])


def test_throughput_steady_quiet(rule_file):
    tokens = [series("distill_tokens_total", "0+1000x240", worker=worker) for worker in (0, 1)]
    promtool_test(rule_file, tokens, "DistillThroughputLow", "230m", [])


def test_throughput_counter_reset_quiet(rule_file):
    # A restart resets the counter; rate() treats the reset as continued counting.
    tokens = series("distill_tokens_total", "0+1000x120 0+1000x120")
    promtool_test(rule_file, [tokens], "DistillThroughputLow", "230m", [])


def test_checkpoint_overdue_fires(rule_file):
    start = series("distill_start_time_seconds", "0x200")
    checkpoint = series("distill_checkpoint_last_success_timestamp_seconds", "_x10 600x190")
    promtool_test(rule_file, [start, checkpoint], "DistillCheckpointOverdue", "131m", [alert("warning")])


def test_checkpoint_recent_quiet(rule_file):
    start = series("distill_start_time_seconds", "0x200")
    checkpoint = series("distill_checkpoint_last_success_timestamp_seconds", "_x10 600x60 4200x60 7800x60")
    promtool_test(rule_file, [start, checkpoint], "DistillCheckpointOverdue", "131m", [])


def test_no_checkpoint_since_start_fires(rule_file):
    start = series("distill_start_time_seconds", "0x200")
    promtool_test(rule_file, [start], "DistillCheckpointOverdue", "121m", [alert("warning")])


def test_checkpoint_failure_fires(rule_file):
    failures = series("distill_checkpoint_failures_total", "0 0 0 1 1 1")
    promtool_test(rule_file, [failures], "DistillCheckpointFailed", "5m", [alert("warning")])


def test_checkpoint_no_failure_quiet(rule_file):
    failures = series("distill_checkpoint_failures_total", "0x10")
    promtool_test(rule_file, [failures], "DistillCheckpointFailed", "9m", [])


def worker_series(worker: int, heartbeat: str, expected: str = "2x30", step: str = "1+1x30") -> list[dict]:
    return [
        series("distill_heartbeat_timestamp_seconds", heartbeat, worker=worker),
        series("distill_expected_workers", expected, worker=worker),
        series("distill_last_completed_step", step, worker=worker),
        series("distill_total_steps", "1000x30", worker=worker),
    ]


def test_one_worker_missing_fires(rule_file):
    layout = worker_series(0, "0+60x30") + worker_series(1, "0+60x10 stale", expected="2x10 stale", step="1+1x10 stale")
    promtool_test(rule_file, layout, "DistillWorkerMissing", "20m", [alert("critical")])


def test_worker_missing_waits_for_duration(rule_file):
    layout = worker_series(0, "0+60x30") + worker_series(1, "0+60x10 stale", expected="2x10 stale", step="1+1x10 stale")
    promtool_test(rule_file, layout, "DistillWorkerMissing", "14m", [])


def test_all_workers_missing_fires(rule_file):
    layout = []
    for worker in (0, 1):
        layout += worker_series(worker, "0+60x10 stale", expected="2x10 stale", step="1+1x10 stale")
    promtool_test(rule_file, layout, "DistillWorkerMissing", "20m", [alert("critical")])


def test_finished_run_not_missing(rule_file):
    layout = []
    for worker in (0, 1):
        layout += worker_series(worker, "0+60x10 stale", expected="2x10 stale", step="990+1x10 stale")
    promtool_test(rule_file, layout, "DistillWorkerMissing", "20m", [])


def test_all_workers_present_quiet(rule_file):
    layout = worker_series(0, "0+60x30") + worker_series(1, "0+60x30")
    promtool_test(rule_file, layout, "DistillWorkerMissing", "25m", [])


def test_double_scrape_counted_once(rule_file):
    # Two monitors scraping worker 0 give two series that differ only in `job`; they count
    # as one worker, so one of the two expected workers is still missing.
    layout = worker_series(0, "0+60x30")
    for item in worker_series(0, "0+60x30"):
        layout.append({"series": item["series"].replace("{", '{job="second", '), "values": item["values"]})
    promtool_test(rule_file, layout, "DistillWorkerMissing", "25m", [alert("critical")])
