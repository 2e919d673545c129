"""Monitoring objects of the chart: scrape configs, rules and the dashboard, checked against the CRDs."""

from __future__ import annotations

import json

import pytest

from helm_render import REPO_ROOT, find, render, render_error, worker_container
from k8s_schema import CrdRegistry

MONITORING_KINDS = ("PodMonitoring", "ServiceMonitor", "PodMonitor", "PrometheusRule", "Rules")
ALL_ON = {
    "monitoring": {
        "podMonitoring": {"enabled": True},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "gmpRules": {"enabled": True},
        "dashboard": {"enabled": True, "annotations": {"grafana_folder": "Distillation"}},
    }
}
CHART_DASHBOARD = REPO_ROOT / "helm" / "distill" / "files" / "dashboard.json"
PLAIN_DASHBOARD = REPO_ROOT / "k8s" / "grafana-dashboard.json"


@pytest.fixture(scope="module")
def crds() -> CrdRegistry:
    return CrdRegistry.from_directory()


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render(values=ALL_ON)


def test_monitoring_off_by_default():
    kinds = {item["kind"] for item in render()}
    for kind in MONITORING_KINDS:
        assert kind not in kinds


@pytest.mark.parametrize("kind", MONITORING_KINDS)
def test_object_matches_crd(objects, crds, kind):
    assert crds.validate(find(objects, kind)) == []


@pytest.mark.parametrize("scenario", ["reference-v4-64.yaml", "cpu-smoke.yaml"])
@pytest.mark.parametrize("kind", MONITORING_KINDS)
def test_scenario_object_matches_crd(crds, scenario, kind):
    assert crds.validate(find(render(scenario, ALL_ON), kind)) == []


def test_pod_monitoring_targets_metrics_port(objects):
    monitor = find(objects, "PodMonitoring")
    ports = {port["name"]: port["containerPort"] for port in worker_container(objects)["ports"]}
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert "metrics" in ports


def test_pod_monitoring_selects_worker_pods(objects):
    selector = find(objects, "PodMonitoring")["spec"]["selector"]["matchLabels"]
    jobset = find(objects, "JobSet")
    pod_labels = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["metadata"]["labels"]
    for key, value in selector.items():
        assert pod_labels.get(key) == value, key


def test_pod_monitor_selects_worker_pods(objects):
    selector = find(objects, "PodMonitor")["spec"]["selector"]["matchLabels"]
    jobset = find(objects, "JobSet")
    pod_labels = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["metadata"]["labels"]
    for key, value in selector.items():
        assert pod_labels.get(key) == value, key


def test_service_monitor_selects_service(objects):
    monitor = find(objects, "ServiceMonitor")
    service = find(objects, "Service")
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert service["metadata"]["labels"].get(key) == value, key
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["port"] in service_ports


def test_service_monitor_extra_labels(objects):
    assert find(objects, "ServiceMonitor")["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_scrape_interval_from_values():
    values = {"monitoring": {"podMonitoring": {"enabled": True, "interval": "15s"}}}
    assert find(render(values=values), "PodMonitoring")["spec"]["endpoints"][0]["interval"] == "15s"


def test_invalid_interval_rejected():
    error = render_error(values={"monitoring": {"podMonitoring": {"enabled": True, "interval": "soon"}}})
    assert "interval" in error


def test_unknown_monitoring_key_rejected():
    error = render_error(values={"monitoring": {"grafana": {"enabled": True}}})
    assert "grafana" in error


def test_dashboard_configmap_labels(objects):
    configmap = next(item for item in objects if item["kind"] == "ConfigMap" and item["metadata"]["name"].endswith("-dashboard"))
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"]["grafana_folder"] == "Distillation"


def test_dashboard_configmap_carries_json(objects):
    configmap = next(item for item in objects if item["kind"] == "ConfigMap" and item["metadata"]["name"].endswith("-dashboard"))
    assert json.loads(configmap["data"]["distill.json"]) == json.loads(CHART_DASHBOARD.read_text())


def test_plain_dashboard_equals_chart_copy():
    assert PLAIN_DASHBOARD.read_text() == CHART_DASHBOARD.read_text()


def test_dashboard_variables():
    dashboard = json.loads(CHART_DASHBOARD.read_text())
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "namespace" in variables["namespace"]["definition"]
    assert '$namespace' in variables["experiment"]["definition"]


def test_dashboard_queries_filtered_by_variables():
    dashboard = json.loads(CHART_DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert 'namespace="$namespace", experiment="$experiment"' in target["expr"], panel["title"]


def test_dashboard_covers_required_panels():
    titles = {panel["title"] for panel in json.loads(CHART_DASHBOARD.read_text())["panels"]}
    required = {
        "Loss terms", "Tokens/s (job)", "Tokens/s per worker", "MFU", "Step time p50 / p95", "Data wait share",
        "Checkpoint age", "Restarts",
    }
    assert required <= titles


def test_dashboard_panel_ids_unique():
    panels = json.loads(CHART_DASHBOARD.read_text())["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))


def test_crd_check_rejects_broken_monitor(objects, crds):
    # Guards against a vacuous check: a typo and a timeout above the interval must be reported.
    monitor = json.loads(json.dumps(find(objects, "PodMonitoring")))
    endpoint = monitor["spec"]["endpoints"][0]
    endpoint["timeout"] = "5m"
    endpoint["intervall"] = "30s"
    problems = crds.validate(monitor)
    assert any("intervall" in problem for problem in problems)
    del endpoint["intervall"]
    assert any("timeout" in problem for problem in crds.validate(monitor))


def test_dashboard_panels_fit_grid():
    # Grafana's grid is 24 columns wide; overlapping panels are moved around on load.
    panels = json.loads(CHART_DASHBOARD.read_text())["panels"]
    cells = set()
    for panel in panels:
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]
        for row in range(position["y"], position["y"] + position["h"]):
            for column in range(position["x"], position["x"] + position["w"]):
                assert (row, column) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((row, column))


def test_dashboard_queries_use_datasource_variable():
    for panel in json.loads(CHART_DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
