"""Render every chart scenario with the real helm and check the objects it produces."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from helm_render import (
    CHART_DIR,
    config_map,
    is_custom_resource,
    KUBE_VERSIONS,
    SCENARIO_DIR,
    SCENARIOS,
    environment,
    find,
    helm,
    render,
    template,
    worker_container,
    worker_job,
)
from k8s_schema import CrdRegistry

CORE_KINDS = {"ConfigMap", "Service", "ServiceAccount"}
# yamllint's default profile, except: long generated lines are fine, helm separates
# documents itself, and toYaml writes block sequences unindented while hand-written
# template lines indent them (both are valid YAML).
YAMLLINT_CONFIG = YamlLintConfig(
    "extends: default\n"
    "rules:\n"
    "  line-length: {max: 200}\n"
    "  document-start: disable\n"
    "  indentation: {spaces: consistent, indent-sequences: whatever}\n"
)


@pytest.fixture(scope="module")
def crds() -> CrdRegistry:
    return CrdRegistry.from_directory()


@pytest.fixture(scope="module")
def reference() -> list[dict]:
    return render("reference-v4-64.yaml")


def test_scenarios_present():
    expected = {"reference-v4-64.yaml", "v4-8-single-host.yaml", "v5litepod-16.yaml", "v6e-256-two-slices.yaml", "cpu-smoke.yaml"}
    assert expected <= set(SCENARIOS)


def test_lint_strict_defaults():
    result = helm("lint", "--strict", str(CHART_DIR))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_strict_scenario(scenario):
    result = helm("lint", "--strict", str(CHART_DIR), "-f", str(SCENARIO_DIR / scenario))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_output_yamllint(scenario):
    problems = list(linter.run(template(scenario), YAMLLINT_CONFIG))
    assert problems == [], "\n".join(f"{p.line}:{p.column} {p.rule}: {p.desc}" for p in problems)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_jobset_matches_crd(scenario, crds):
    jobset = find(render(scenario), "JobSet")
    assert crds.validate(jobset) == []


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_custom_resources_match_crds(scenario, crds):
    for item in render(scenario):
        if is_custom_resource(item):
            assert crds.validate(item) == [], f"{item['kind']} {item['metadata']['name']}"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_core_kinds_strict(scenario, kube_version):
    objects = render(scenario, kube_version=f"{kube_version}.0")
    core = [item for item in objects if not is_custom_resource(item)]
    assert CORE_KINDS <= {item["kind"] for item in core}
    for item in core:
        kubernetes_validate.validate(item, kube_version, strict=True)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_job_template_strict(scenario, kube_version):
    # The CRD schema embeds batch/v1 JobSpec; check it against the core schema of each
    # Kubernetes version too, since that is what the JobSet controller submits.
    objects = render(scenario, kube_version=f"{kube_version}.0")
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "worker"}, "spec": worker_job(objects)["template"]["spec"]}
    kubernetes_validate.validate(job, kube_version, strict=True)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_configmap_passes_distill_validate(scenario, tmp_path):
    rendered_config = config_map(render(scenario))
    config_path = tmp_path / "config.yaml"
    config_path.write_text(rendered_config["data"]["config.yaml"], encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "distill", "validate", str(config_path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["experiment"]["name"]


def test_reference_pod_count(reference):
    job = worker_job(reference)
    assert job["replicas"] == 1
    assert job["template"]["spec"]["parallelism"] == 8
    assert job["template"]["spec"]["completions"] == 8
    assert job["template"]["spec"]["completionMode"] == "Indexed"
    assert job["template"]["spec"]["backoffLimit"] == 0


def test_reference_tpu_request(reference):
    resources = worker_container(reference)["resources"]
    assert resources["requests"]["google.com/tpu"] == 4
    assert resources["limits"]["google.com/tpu"] == 4


def test_reference_node_selector(reference):
    pod = worker_job(reference)["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v4-podslice"
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x4x4"
    assert "node.kubernetes.io/instance-type" not in pod["nodeSelector"]


def test_reference_tpu_toleration(reference):
    pod = worker_job(reference)["template"]["spec"]["template"]["spec"]
    assert {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_reference_exclusive_topology(reference):
    annotations = find(reference, "JobSet")["metadata"]["annotations"]
    assert annotations["alpha.jobset.sigs.k8s.io/exclusive-topology"] == "cloud.google.com/gke-nodepool"


def test_reference_dns_hostnames(reference):
    network = find(reference, "JobSet")["spec"]["network"]
    assert network["enableDNSHostnames"] is True
    assert network["subdomain"] == "exp-distill"


def test_reference_process_environment(reference):
    env = environment(worker_container(reference))
    assert env["DISTILL_EXPERIMENT"] == "qwen3-14b-to-0p6b"
    assert env["DISTILL_WORKER_INDEX"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["DISTILL_SLICE_INDEX"]["fieldRef"]["fieldPath"] == "metadata.annotations['jobset.sigs.k8s.io/job-index']"
    assert env["DISTILL_NUM_SLICES"] == "1"
    assert env["DISTILL_HOSTS_PER_SLICE"] == "8"
    assert env["DISTILL_ACCELERATOR"] == "tpu"
    assert env["DISTILL_TPU_TYPE"] == "v4-64"
    assert env["DISTILL_COORDINATOR_ADDRESS"] == ""
    assert env["JAX_COORDINATOR_PORT"] == "8476"
    assert env["DISTILL_RESTART_ATTEMPT"]["fieldRef"]["fieldPath"] == "metadata.annotations['jobset.sigs.k8s.io/restart-attempt']"
    assert "MEGASCALE_NUM_SLICES" not in env


def test_reference_command_and_config_mount(reference):
    container = worker_container(reference)
    assert container["command"] == ["distill"]
    assert container["args"] == ["train", "/etc/distill/config.yaml"]
    mount = next(item for item in container["volumeMounts"] if item["name"] == "config")
    assert mount["mountPath"] == "/etc/distill"
    volumes = worker_job(reference)["template"]["spec"]["template"]["spec"]["volumes"]
    config_volume = next(item for item in volumes if item["name"] == "config")
    assert config_volume["configMap"]["name"] == config_map(reference)["metadata"]["name"]


def test_reference_config_values(reference):
    config = yaml.safe_load(config_map(reference)["data"]["config.yaml"])
    assert config["teacher"]["path"] == "Qwen/Qwen3-14B"
    assert config["data"]["sources"][0]["path"] == "tiiuae/falcon-refinedweb"
    assert config["data"]["sources"][0]["type"] == "hub"
    assert config["data"]["sources"][0]["content_field"] == "content"
    assert config["data"]["streaming"] is True
    assert config["distillation"]["temperature"] == 2.0
    assert config["distillation"]["alpha"] == 0.9
    assert config["training"]["per_epoch_training_steps"] == 98_000_000
    assert config["training"]["save_directory"].startswith("gs://")


def test_failure_policy_rules(reference):
    policy = find(reference, "JobSet")["spec"]["failurePolicy"]
    rules = {rule["name"]: rule for rule in policy["rules"]}
    assert policy["maxRestarts"] == 3
    assert rules["fail-on-invalid-config-or-input"]["action"] == "FailJobSet"
    assert rules["fail-on-invalid-config-or-input"]["onJobFailureReasons"] == ["PodFailurePolicy"]
    assert rules["restart-on-retriable-failure"]["action"] == "RestartJobSet"
    assert rules["restart-on-retriable-failure"]["onJobFailureReasons"] == ["BackoffLimitExceeded"]


def test_pod_failure_policy_exit_codes(reference):
    from distill.exitcodes import NON_RETRIABLE, RETRIABLE

    rules = worker_job(reference)["template"]["spec"]["podFailurePolicy"]["rules"]
    fail_job = [rule for rule in rules if rule["action"] == "FailJob"]
    count = [rule for rule in rules if rule["action"] == "Count"]
    ignore = [rule for rule in rules if rule["action"] == "Ignore"]
    assert sorted(fail_job[0]["onExitCodes"]["values"]) == sorted(int(code) for code in NON_RETRIABLE)
    assert fail_job[0]["onExitCodes"]["containerName"] == "distill"
    assert sorted(count[0]["onExitCodes"]["values"]) == sorted(int(code) for code in RETRIABLE)
    assert ignore[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert rules.index(fail_job[0]) < rules.index(ignore[0])


def test_restart_policy_never(reference):
    pod = worker_job(reference)["template"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] == 300


def test_security_contexts(reference):
    pod = worker_job(reference)["template"]["spec"]["template"]["spec"]
    container = worker_container(reference)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "privileged" not in container["securityContext"]
    writable = {item["mountPath"] for item in container["volumeMounts"] if not item.get("readOnly")}
    assert {"/cache", "/tmp"} <= writable


def test_secret_references_only(reference):
    env = environment(worker_container(reference))
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert "WANDB_API_KEY" not in env


def test_workload_identity_annotation(reference):
    account = find(reference, "ServiceAccount")
    pod = worker_job(reference)["template"]["spec"]["template"]["spec"]
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"] == "distill-trainer@my-project.iam.gserviceaccount.com"
    assert pod["serviceAccountName"] == account["metadata"]["name"]


def test_labels_conventions(reference):
    chart_objects = [find(reference, "JobSet"), config_map(reference), find(reference, "Service"), find(reference, "ServiceAccount")]
    for item in chart_objects:
        labels = item["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "distill", item["kind"]
        assert labels["app.kubernetes.io/instance"] == "exp", item["kind"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm", item["kind"]
        assert labels["distill/experiment"] == "qwen3-14b-to-0p6b", item["kind"]


def test_headless_service_selects_workers(reference):
    service = find(reference, "Service")
    pod_labels = worker_job(reference)["template"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["port"] == 9400


def test_multislice_environment():
    objects = render("v6e-256-two-slices.yaml")
    job = worker_job(objects)
    env = environment(worker_container(objects))
    ports = {port["name"]: port["containerPort"] for port in worker_container(objects)["ports"]}
    assert job["replicas"] == 2
    assert job["template"]["spec"]["parallelism"] == 64
    assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "exp-distill-workers-0-0.exp-distill"
    assert env["MEGASCALE_NUM_SLICES"] == "2"
    assert env["MEGASCALE_SLICE_ID"]["fieldRef"]["fieldPath"] == "metadata.annotations['jobset.sigs.k8s.io/job-index']"
    assert env["MEGASCALE_PORT"] == "8080"
    assert ports["megascale"] == 8080
    assert env["DISTILL_NUM_SLICES"] == "2"


def test_single_host_v4_8():
    objects = render("v4-8-single-host.yaml")
    job = worker_job(objects)
    pod = job["template"]["spec"]["template"]["spec"]
    assert job["template"]["spec"]["parallelism"] == 1
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x2x1"
    assert worker_container(objects)["resources"]["limits"]["google.com/tpu"] == 4


def test_v5litepod_kueue_and_priority():
    objects = render("v5litepod-16.yaml")
    jobset = find(objects, "JobSet")
    pod = worker_job(objects)["template"]["spec"]["template"]["spec"]
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "tpu-v5e"
    assert pod["priorityClassName"] == "low-priority"
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v5-lite-podslice"
    assert worker_job(objects)["template"]["spec"]["parallelism"] == 4


def test_cpu_smoke_has_no_tpu():
    objects = render("cpu-smoke.yaml")
    jobset = find(objects, "JobSet")
    pod = worker_job(objects)["template"]["spec"]["template"]["spec"]
    container = worker_container(objects)
    assert "google.com/tpu" not in container["resources"]["requests"]
    assert "google.com/tpu" not in container["resources"]["limits"]
    assert "nodeSelector" not in pod
    assert "tolerations" not in pod
    assert "annotations" not in jobset["metadata"]


def test_cpu_smoke_coordinator():
    objects = render("cpu-smoke.yaml")
    env = environment(worker_container(objects))
    assert worker_job(objects)["template"]["spec"]["parallelism"] == 2
    assert env["DISTILL_COORDINATOR_ADDRESS"] == "exp-distill-workers-0-0.exp-distill:8476"
    assert env["DISTILL_ACCELERATOR"] == "cpu"
    assert env["DISTILL_TPU_TYPE"] == ""
    assert env["DISTILL_HOSTS_PER_SLICE"] == "2"


def test_cpu_smoke_hosts_configurable():
    objects = render("cpu-smoke.yaml", {"cpu": {"hosts": 3}, "config": {"training": {"total_batch_size": 6}}})
    assert worker_job(objects)["template"]["spec"]["completions"] == 3


def test_experiment_name_defaults_to_release():
    objects = render(None, release="my-run")
    config = yaml.safe_load(config_map(objects)["data"]["config.yaml"])
    assert config["experiment"]["name"] == "my-run"
    assert environment(worker_container(objects))["DISTILL_EXPERIMENT"] == "my-run"


def _render_notes(tmp_path: Path) -> str:
    # `helm install --dry-run` needs a reachable cluster, so NOTES.txt is rendered through
    # `tpl` inside a throwaway ConfigMap template added to a copy of the chart.
    chart = tmp_path / "distill"
    shutil.copytree(CHART_DIR, chart)
    # .Files cannot read templates/, so the notes template is copied under files/.
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "files" / "notes-test.txt")
    (chart / "templates" / "notes-test.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n"
        '{{ tpl (.Files.Get "files/notes-test.txt") . | indent 4 }}\n',
        encoding="utf-8",
    )
    result = helm(
        "template", "exp", str(chart), "--namespace", "ml", "--show-only", "templates/notes-test.yaml",
        "-f", str(SCENARIO_DIR / "reference-v4-64.yaml"),
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["data"]["notes"]


def test_notes_commands(tmp_path):
    notes = _render_notes(tmp_path)
    assert "kubectl logs -f -n ml -c distill -l jobset.sigs.k8s.io/jobset-name=exp-distill,jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0" in notes
    assert "kubectl get pods -n ml -l jobset.sigs.k8s.io/jobset-name=exp-distill" in notes
    assert "kubectl port-forward -n ml" in notes
    assert "9400:metrics" in notes
    assert "1 x v4-64 (8 pods per slice, 4 chips each, topology 2x4x4)" in notes


def test_chart_files_exist():
    for name in ("README.md", "values.yaml", "values.schema.json", "templates/NOTES.txt", "files/tpu-topologies.yaml"):
        assert Path(CHART_DIR / name).is_file(), name
