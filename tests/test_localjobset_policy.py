"""distill.jobset: pod expansion and the Job and JobSet failure policies on hand-written manifests."""

from __future__ import annotations

import pytest

from distill.jobset import (
    JobFailure,
    ManifestError,
    jobset_failure_decision,
    jobset_succeeded,
    parse_jobset,
    pod_failure_action,
)


def manifest(failure_policy=None, success_policy=None, replicated_jobs=None, pod_failure_rules=None):
    """Return a minimal rendered JobSet with one ConfigMap, shaped like the chart's output."""
    pod_spec = {
        "restartPolicy": "Never",
        "containers": [{"name": "distill", "command": ["distill"], "args": ["train", "/etc/distill/config.yaml"]}],
    }
    job_template = {
        "spec": {
            "parallelism": 2,
            "completions": 2,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "podFailurePolicy": {"rules": pod_failure_rules or []},
            "template": {"spec": pod_spec},
        }
    }
    spec = {
        "network": {"enableDNSHostnames": True, "subdomain": "run"},
        "replicatedJobs": replicated_jobs or [{"name": "workers", "replicas": 2, "template": job_template}],
    }
    if failure_policy is not None:
        spec["failurePolicy"] = failure_policy
    if success_policy is not None:
        spec["successPolicy"] = success_policy
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "run-config"}, "data": {"config.yaml": "a: 1\n"}},
        {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": "run"}, "spec": spec},
    ]


EXIT_CODE_RULES = [
    {"action": "FailJob", "onExitCodes": {"containerName": "distill", "operator": "In", "values": [2, 3]}},
    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    {"action": "Count", "onExitCodes": {"operator": "NotIn", "values": [0, 2, 3]}},
]


def test_expand_hostnames_and_indexes():
    jobset = parse_jobset(manifest())
    assert jobset.hostnames() == ["run-workers-0-0", "run-workers-0-1", "run-workers-1-0", "run-workers-1-1"]
    pod = jobset.pods[3]
    assert pod.job_index == 1
    assert pod.pod_index == 1
    assert pod.job_name == "run-workers-1"
    assert pod.subdomain == "run"
    metadata = pod.metadata(restart_attempt=2)
    assert metadata["batch.kubernetes.io/job-completion-index"] == "1"
    assert metadata["jobset.sigs.k8s.io/job-index"] == "1"
    assert metadata["jobset.sigs.k8s.io/jobset-name"] == "run"
    assert metadata["jobset.sigs.k8s.io/restart-attempt"] == "2"
    assert jobset.config_maps == {"run-config": {"config.yaml": "a: 1\n"}}


def test_expand_global_job_index_across_replicated_jobs():
    template = manifest()[1]["spec"]["replicatedJobs"][0]["template"]
    jobset = parse_jobset(manifest(replicated_jobs=[
        {"name": "a", "replicas": 2, "template": template},
        {"name": "b", "replicas": 1, "template": template},
    ]))
    assert [pod.job_global_index for pod in jobset.pods] == [0, 0, 1, 1, 2, 2]


def test_expand_rejects_partial_parallelism():
    documents = manifest()
    documents[1]["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] = 1
    with pytest.raises(ManifestError) as error:
        parse_jobset(documents)
    assert "parallelism 1 is below completions 2" in str(error.value)


def test_expand_rejects_two_jobsets():
    documents = manifest()
    with pytest.raises(ManifestError) as error:
        parse_jobset(documents + [documents[1]])
    assert "found 2 JobSet objects" in str(error.value)


@pytest.mark.parametrize(
    ("exit_code", "expected"),
    [(2, ("FailJob", 0)), (3, ("FailJob", 0)), (1, ("Count", 2)), (137, ("Count", 2))],
)
def test_pod_failure_action_exit_codes(exit_code, expected):
    job = parse_jobset(manifest(pod_failure_rules=EXIT_CODE_RULES)).jobs[0]
    assert pod_failure_action(job, "distill", exit_code) == expected


def test_pod_failure_action_other_container():
    job = parse_jobset(manifest(pod_failure_rules=EXIT_CODE_RULES)).jobs[0]
    # The FailJob rule names container "distill" and the Count rule excludes 2, so no rule
    # matches a sidecar's exit 2 and the failure counts by default.
    assert pod_failure_action(job, "sidecar", 2) == ("Count", None)


def test_pod_failure_action_default_counts():
    job = parse_jobset(manifest()).jobs[0]
    assert pod_failure_action(job, "distill", 2) == ("Count", None)


def failure_of(jobset, reason, message="", job_index=0):
    return JobFailure(job=jobset.jobs[job_index], reason=reason, message=message, exit_code=1)


def test_decision_without_policy_fails():
    jobset = parse_jobset(manifest())
    decision = jobset_failure_decision(jobset, failure_of(jobset, "BackoffLimitExceeded"))
    assert decision.action == "FailJobSet"
    assert jobset.max_restarts == 0


def test_decision_first_matching_rule():
    policy = {
        "maxRestarts": 3,
        "rules": [
            {"name": "config", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]},
            {"name": "retry", "action": "RestartJobSet", "onJobFailureReasons": ["BackoffLimitExceeded"]},
        ],
    }
    jobset = parse_jobset(manifest(failure_policy=policy))
    config_error = jobset_failure_decision(jobset, failure_of(jobset, "PodFailurePolicy"))
    retriable = jobset_failure_decision(jobset, failure_of(jobset, "BackoffLimitExceeded"))
    assert (config_error.action, config_error.rule_name) == ("FailJobSet", "config")
    assert (retriable.action, retriable.rule_name) == ("RestartJobSet", "retry")
    assert retriable.counts_restart is True


def test_decision_no_match_restarts():
    policy = {"maxRestarts": 1, "rules": [{"name": "only", "action": "FailJobSet", "onJobFailureReasons": ["DeadlineExceeded"]}]}
    jobset = parse_jobset(manifest(failure_policy=policy))
    decision = jobset_failure_decision(jobset, failure_of(jobset, "BackoffLimitExceeded"))
    assert decision.action == "RestartJobSet"
    assert decision.rule_name is None


def test_decision_message_pattern_and_target():
    policy = {
        "maxRestarts": 1,
        "rules": [
            {"name": "other", "action": "FailJobSet", "targetReplicatedJobs": ["drivers"]},
            {"name": "oom", "action": "RestartJobSetAndIgnoreMaxRestarts", "onJobFailureMessagePatterns": ["exit code 137"]},
        ],
    }
    jobset = parse_jobset(manifest(failure_policy=policy))
    killed = jobset_failure_decision(jobset, failure_of(jobset, "BackoffLimitExceeded", "pod exited with exit code 137"))
    other = jobset_failure_decision(jobset, failure_of(jobset, "BackoffLimitExceeded", "exit code 1"))
    assert (killed.action, killed.counts_restart) == ("RestartJobSetAndIgnoreMaxRestarts", False)
    assert (other.action, other.rule_name) == ("RestartJobSet", None)


def test_success_policy_all_and_any():
    all_jobs = parse_jobset(manifest())
    any_job = parse_jobset(manifest(success_policy={"operator": "Any", "targetReplicatedJobs": ["workers"]}))
    assert jobset_succeeded(all_jobs, {"run-workers-0"}) is False
    assert jobset_succeeded(all_jobs, {"run-workers-0", "run-workers-1"}) is True
    assert jobset_succeeded(any_job, {"run-workers-1"}) is True
    assert jobset_succeeded(any_job, set()) is False
