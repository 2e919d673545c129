"""Run the real Helm binary on the distill chart and parse what it renders.

Helm comes from scripts/install-helm.sh (.tools/bin/helm) or the HELM environment variable.
Rendering is offline (`helm template`), with the JobSet API declared available, because no
API server runs in the test environment.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = REPO_ROOT / "helm" / "distill"
SCENARIO_DIR = CHART_DIR / "ci"
SCENARIOS = sorted(path.name for path in SCENARIO_DIR.glob("*.yaml"))
HELM = Path(os.environ.get("HELM", REPO_ROOT / ".tools" / "bin" / "helm"))

# Kubernetes minor versions checked: the GKE release channels (rapid to extended) in late
# 2026 span about 1.32 to 1.35, and the chart's kubeVersion floor is 1.31.
KUBE_VERSIONS = ("1.32", "1.33", "1.34", "1.35")
DEFAULT_KUBE_VERSION = "1.34.0"
API_VERSIONS = ("jobset.x-k8s.io/v1alpha2",)


class HelmError(RuntimeError):
    """helm exited non-zero; the message is its stderr."""


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Run helm with `args` and return the finished process (never raises on exit status)."""
    if not HELM.exists():
        raise FileNotFoundError(f"helm not found at {HELM}; run scripts/install-helm.sh or set HELM")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120, check=False)


def _values_arguments(scenario: str | None, values: dict[str, Any] | None, directory: Path) -> list[str]:
    arguments = []
    if scenario is not None:
        arguments += ["-f", str(SCENARIO_DIR / scenario)]
    if values is not None:
        override = directory / "override.yaml"
        override.write_text(yaml.safe_dump(values), encoding="utf-8")
        arguments += ["-f", str(override)]
    return arguments


def template(
    scenario: str | None = None,
    values: dict[str, Any] | None = None,
    release: str = "exp",
    kube_version: str = DEFAULT_KUBE_VERSION,
    extra: tuple[str, ...] = (),
) -> str:
    """Return `helm template` output for a scenario file plus optional override values."""
    with tempfile.TemporaryDirectory() as directory:
        arguments = ["template", release, str(CHART_DIR), "--namespace", "ml", "--kube-version", kube_version]
        for api_version in API_VERSIONS:
            arguments += ["--api-versions", api_version]
        arguments += _values_arguments(scenario, values, Path(directory))
        result = helm(*arguments, *extra)
    if result.returncode != 0:
        raise HelmError(result.stderr.strip())
    return result.stdout


def render(scenario: str | None = None, values: dict[str, Any] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """Return the rendered objects (parsed YAML documents, empty ones dropped)."""
    return [document for document in yaml.safe_load_all(template(scenario, values, **kwargs)) if document]


def render_error(scenario: str | None = None, values: dict[str, Any] | None = None) -> str:
    """Return helm's error output for values that must fail; raise AssertionError if rendering succeeds."""
    try:
        template(scenario, values)
    except HelmError as error:
        return str(error)
    raise AssertionError(f"rendering succeeded but was expected to fail for values {values!r}")


def find(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Return the single object of `kind`."""
    matches = [item for item in objects if item["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def config_map(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the ConfigMap that contains the experiment config (other ConfigMaps may exist)."""
    matches = [item for item in objects if item["kind"] == "ConfigMap" and "config.yaml" in item.get("data", {})]
    assert len(matches) == 1, f"expected one ConfigMap with config.yaml, found {len(matches)}"
    return matches[0]


def is_custom_resource(item: dict[str, Any]) -> bool:
    """Whether the object's API group is not a built-in one (the group contains a dot)."""
    group = item["apiVersion"].rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


def worker_job(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the JobSet's only replicated job."""
    jobset = find(objects, "JobSet")
    replicated_jobs = jobset["spec"]["replicatedJobs"]
    assert len(replicated_jobs) == 1, f"expected one replicated job, found {len(replicated_jobs)}"
    return replicated_jobs[0]


def worker_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the `distill` container of the worker pods."""
    containers = worker_job(objects)["template"]["spec"]["template"]["spec"]["containers"]
    return next(container for container in containers if container["name"] == "distill")


def environment(container: dict[str, Any]) -> dict[str, Any]:
    """Return the container's env entries keyed by name (value or valueFrom)."""
    return {entry["name"]: entry.get("value", entry.get("valueFrom")) for entry in container.get("env", [])}
