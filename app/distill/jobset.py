"""A JobSet as its controller handles it: pods expanded from the spec, and the failure policies.

Pure functions over rendered manifests (`helm template` output), shared by the local JobSet
runner and its tests. Semantics follow JobSet v1alpha2 (controller 0.12) and the batch/v1 Job
controller: each replicated job has `replicas` Jobs, each Indexed Job has `completions` pods,
a pod's hostname is <jobset>-<replicatedJob>-<jobIndex>-<podIndex> under the subdomain, a failed
pod goes through the Job's podFailurePolicy and backoffLimit, and a failed Job goes through
the JobSet's failurePolicy rules, where the first matching rule wins.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

logger = logging.getLogger(__name__)

JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"

# Annotations and labels that the JobSet and Job controllers put on every pod.
JOB_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_NAME = "jobset.sigs.k8s.io/replicatedjob-name"
REPLICATED_JOB_REPLICAS = "jobset.sigs.k8s.io/replicatedjob-replicas"
JOB_INDEX = "jobset.sigs.k8s.io/job-index"
JOB_GLOBAL_INDEX = "jobset.sigs.k8s.io/job-global-index"
RESTART_ATTEMPT = "jobset.sigs.k8s.io/restart-attempt"

# Defaults that the API server or the JobSet webhook fill in when the manifest omits them.
DEFAULT_BACKOFF_LIMIT = 6
DEFAULT_TERMINATION_GRACE_SECONDS = 30

# Failure reasons that the Job controller sets on a failed Job.
REASON_POD_FAILURE_POLICY = "PodFailurePolicy"
REASON_BACKOFF_LIMIT = "BackoffLimitExceeded"

RESTART_ACTIONS = ("RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts", "RestartJob", "RestartJobAndIgnoreMaxRestarts")


class ManifestError(ValueError):
    """Rendered manifests that the local runner cannot run; the message names the object and the fix."""


@dataclass(frozen=True)
class Pod:
    """One pod of the JobSet as the controllers would create it."""

    hostname: str
    """<jobset>-<replicatedJob>-<jobIndex>-<podIndex>; also the prefix of its log lines."""
    subdomain: str
    replicated_job: str
    job_index: int
    pod_index: int
    job_global_index: int
    replicas: int
    spec: dict[str, Any]
    """The pod template's spec (containers, volumes, grace period)."""

    @property
    def job_name(self) -> str:
        return self.hostname.rsplit("-", 1)[0]

    @property
    def container(self) -> dict[str, Any]:
        return self.spec["containers"][0]

    @property
    def termination_grace_seconds(self) -> int:
        return int(self.spec.get("terminationGracePeriodSeconds", DEFAULT_TERMINATION_GRACE_SECONDS))

    def metadata(self, restart_attempt: int) -> dict[str, str]:
        """Return the annotations (the same keys are labels) that the controllers set on this pod."""
        return {
            JOB_COMPLETION_INDEX: str(self.pod_index),
            JOBSET_NAME: self.hostname[: -len(f"-{self.replicated_job}-{self.job_index}-{self.pod_index}")],
            REPLICATED_JOB_NAME: self.replicated_job,
            REPLICATED_JOB_REPLICAS: str(self.replicas),
            JOB_INDEX: str(self.job_index),
            JOB_GLOBAL_INDEX: str(self.job_global_index),
            RESTART_ATTEMPT: str(restart_attempt),
        }


@dataclass(frozen=True)
class Job:
    """One child Job: its pods and the rules that decide when it fails."""

    name: str
    replicated_job: str
    pods: tuple[Pod, ...]
    backoff_limit: int
    pod_failure_rules: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class JobFailure:
    """A failed Job, with the reason and message that the Job controller records."""

    job: Job
    reason: str
    message: str
    exit_code: int


@dataclass(frozen=True)
class Decision:
    """The JobSet controller's response to a failed Job."""

    action: str
    rule_name: str | None
    counts_restart: bool


@dataclass
class JobSet:
    """A rendered JobSet with the ConfigMaps it mounts."""

    name: str
    namespace: str
    subdomain: str
    jobs: tuple[Job, ...]
    max_restarts: int
    failure_rules: tuple[dict[str, Any], ...] | None
    """None when the JobSet has no failurePolicy: then any Job failure fails the JobSet."""
    success_operator: str
    success_targets: tuple[str, ...]
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def pods(self) -> list[Pod]:
        return [pod for job in self.jobs for pod in job.pods]

    def hostnames(self) -> list[str]:
        return [pod.hostname for pod in self.pods]


def load_documents(text: str) -> list[dict[str, Any]]:
    """Parse multi-document YAML and drop empty documents (helm template emits some)."""
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        raise ManifestError(f"the rendered manifests are not valid YAML: {error}") from None
    return [document for document in documents if isinstance(document, dict)]


def _int_field(value: Any, where: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ManifestError(f"{where}={value!r} is not a non-negative integer")
    return value


def _expand_replicated_job(
    jobset_name: str, subdomain: str, replicated: dict[str, Any], global_offset: int
) -> list[Job]:
    name = replicated.get("name")
    if not name:
        raise ManifestError(f"JobSet {jobset_name}: a replicatedJobs entry has no name")
    where = f"JobSet {jobset_name}, replicatedJob {name}"
    replicas = _int_field(replicated.get("replicas"), f"{where}: replicas", 1)
    job_spec = (replicated.get("template") or {}).get("spec") or {}
    completions = _int_field(job_spec.get("completions"), f"{where}: completions", 1)
    parallelism = _int_field(job_spec.get("parallelism"), f"{where}: parallelism", completions)
    if parallelism < completions:
        raise ManifestError(
            f"{where}: parallelism {parallelism} is below completions {completions}; the local runner "
            "starts every index at once, as a multi-host JAX run needs, so set parallelism to completions"
        )
    mode = job_spec.get("completionMode", "Indexed")
    if mode != "Indexed":
        raise ManifestError(f"{where}: completionMode {mode!r} is not supported; JobSet workers use Indexed")

    pod_spec = ((job_spec.get("template") or {}).get("spec")) or {}
    containers = pod_spec.get("containers") or []
    if len(containers) != 1:
        raise ManifestError(f"{where}: the pod template has {len(containers)} containers; the local runner runs exactly one")
    if pod_spec.get("initContainers"):
        raise ManifestError(f"{where}: initContainers are not supported by the local runner; remove them for local runs")

    jobs = []
    for job_index in range(replicas):
        pods = tuple(
            Pod(
                hostname=f"{jobset_name}-{name}-{job_index}-{pod_index}",
                subdomain=subdomain,
                replicated_job=name,
                job_index=job_index,
                pod_index=pod_index,
                job_global_index=global_offset + job_index,
                replicas=replicas,
                spec=pod_spec,
            )
            for pod_index in range(completions)
        )
        jobs.append(
            Job(
                name=f"{jobset_name}-{name}-{job_index}",
                replicated_job=name,
                pods=pods,
                backoff_limit=_int_field(job_spec.get("backoffLimit"), f"{where}: backoffLimit", DEFAULT_BACKOFF_LIMIT),
                pod_failure_rules=tuple((job_spec.get("podFailurePolicy") or {}).get("rules") or ()),
            )
        )
    return jobs


def parse_jobset(documents: list[dict[str, Any]], namespace: str = "default") -> JobSet:
    """Return the one JobSet among `documents`, expanded into Jobs and pods, with its ConfigMaps."""
    jobsets = [d for d in documents if d.get("kind") == "JobSet"]
    if len(jobsets) != 1:
        raise ManifestError(
            f"found {len(jobsets)} JobSet objects in the rendered manifests; pass the output of one "
            "`helm template` of the distill chart, which renders exactly one"
        )
    manifest = jobsets[0]
    api_version = manifest.get("apiVersion")
    if api_version != JOBSET_API_VERSION:
        raise ManifestError(f"JobSet apiVersion {api_version!r} is not supported; the runner reads {JOBSET_API_VERSION}")

    metadata = manifest.get("metadata") or {}
    name = metadata.get("name")
    if not name:
        raise ManifestError("the JobSet has no metadata.name")
    spec = manifest.get("spec") or {}
    network = spec.get("network") or {}
    subdomain = network.get("subdomain") or name

    jobs: list[Job] = []
    for replicated in spec.get("replicatedJobs") or []:
        jobs.extend(_expand_replicated_job(name, subdomain, replicated, len(jobs)))
    if not jobs:
        raise ManifestError(f"JobSet {name} has no replicatedJobs")

    failure_policy = spec.get("failurePolicy")
    success_policy = spec.get("successPolicy") or {}
    config_maps = {
        (d.get("metadata") or {}).get("name"): {str(k): str(v) for k, v in (d.get("data") or {}).items()}
        for d in documents
        if d.get("kind") == "ConfigMap"
    }
    return JobSet(
        name=name,
        namespace=metadata.get("namespace") or namespace,
        subdomain=subdomain,
        jobs=tuple(jobs),
        max_restarts=_int_field((failure_policy or {}).get("maxRestarts"), "failurePolicy.maxRestarts", 0),
        failure_rules=None if failure_policy is None else tuple(failure_policy.get("rules") or ()),
        success_operator=success_policy.get("operator", "All"),
        success_targets=tuple(success_policy.get("targetReplicatedJobs") or ()),
        config_maps=config_maps,
    )


def _exit_codes_match(requirement: dict[str, Any], container_name: str, exit_code: int) -> bool:
    required_container = requirement.get("containerName")
    if required_container and required_container != container_name:
        return False
    values = set(requirement.get("values") or ())
    operator = requirement.get("operator")
    if operator == "In":
        return exit_code in values
    if operator == "NotIn":
        return exit_code not in values
    raise ManifestError(f"podFailurePolicy onExitCodes.operator {operator!r} is invalid; use In or NotIn")


def pod_failure_action(job: Job, container_name: str, exit_code: int) -> tuple[str, int | None]:
    """Return the Job controller's action for a pod that exited with `exit_code`, and the rule index.

    Pod conditions (such as DisruptionTarget after a preemption or eviction) never hold for a
    local process, so only onExitCodes rules can match. Without a matching rule the failure counts.
    """
    for index, rule in enumerate(job.pod_failure_rules):
        requirement = rule.get("onExitCodes")
        if requirement and _exit_codes_match(requirement, container_name, exit_code):
            return rule["action"], index
    return "Count", None


def jobset_failure_decision(jobset: JobSet, failure: JobFailure) -> Decision:
    """Return what the JobSet controller does about `failure`: the first matching rule's action.

    No failurePolicy means FailJobSet. With a policy but no matching rule, the JobSet restarts.
    """
    if jobset.failure_rules is None:
        return Decision(action="FailJobSet", rule_name=None, counts_restart=False)
    for index, rule in enumerate(jobset.failure_rules):
        reasons = rule.get("onJobFailureReasons") or []
        if reasons and failure.reason not in reasons:
            continue
        targets = rule.get("targetReplicatedJobs") or []
        if targets and failure.job.replicated_job not in targets:
            continue
        patterns = rule.get("onJobFailureMessagePatterns") or []
        if patterns and not any(re.search(pattern, failure.message) for pattern in patterns):
            continue
        action = rule.get("action")
        name = rule.get("name") or f"failurePolicyRule{index}"
        return Decision(action=action, rule_name=name, counts_restart=not str(action).endswith("IgnoreMaxRestarts"))
    return Decision(action="RestartJobSet", rule_name=None, counts_restart=True)


def jobset_succeeded(jobset: JobSet, completed_jobs: set[str]) -> bool:
    """Return True when the success policy holds for the Jobs named in `completed_jobs`."""
    targets = [
        job for job in jobset.jobs if not jobset.success_targets or job.replicated_job in jobset.success_targets
    ]
    done = [job.name in completed_jobs for job in targets]
    if jobset.success_operator == "Any":
        return any(done)
    return all(done)
