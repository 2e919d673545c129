"""The offline CRD validator (k8s_schema) catches what the API server would reject on create."""

from __future__ import annotations

import copy

import pytest

from helm_render import find, render
from k8s_schema import CelRule, CrdRegistry, count_rules, evaluate_rule, parse_go_duration


@pytest.fixture(scope="module")
def crds() -> CrdRegistry:
    return CrdRegistry.from_directory()


@pytest.fixture(scope="module")
def jobset() -> dict:
    return find(render("cpu-smoke.yaml"), "JobSet")


def test_jobset_rule_count(crds):
    openapi = crds.get("jobset.x-k8s.io/v1alpha2", "JobSet").openapi
    assert count_rules(openapi) == 8


def test_unknown_field_rejected(crds, jobset):
    bad = copy.deepcopy(jobset)
    bad["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelizm"] = 2
    problems = crds.validate(bad)
    assert any("'parallelizm' was unexpected" in problem for problem in problems)


def test_rule_name_required(crds, jobset):
    bad = copy.deepcopy(jobset)
    del bad["spec"]["failurePolicy"]["rules"][0]["name"]
    problems = crds.validate(bad)
    assert any("'name' is a required property" in problem for problem in problems)


def test_unknown_action_rejected(crds, jobset):
    bad = copy.deepcopy(jobset)
    bad["spec"]["failurePolicy"]["rules"][0]["action"] = "FailJobset"
    assert crds.validate(bad) != []


def test_cel_startup_policy_rule(crds, jobset):
    bad = copy.deepcopy(jobset)
    bad["spec"]["startupPolicy"] = {"startupPolicyOrder": "InOrder"}
    bad["spec"]["replicatedJobs"][0]["dependsOn"] = [{"name": "other", "status": "Ready"}]
    assert crds.validate(bad) == ["JobSet.spec: StartupPolicy and DependsOn APIs are mutually exclusive"]


def test_cel_volume_claim_namespace_rule(crds, jobset):
    bad = copy.deepcopy(jobset)
    bad["spec"]["volumeClaimPolicies"] = [{"templates": [{"metadata": {"name": "data", "namespace": "other"}, "spec": {}}]}]
    problems = crds.validate(bad)
    assert any("namespace cannot be set" in problem for problem in problems)


def test_update_only_rules_skipped():
    rule = CelRule(rule="self == oldSelf", message="Value is immutable", schema={})
    assert rule.update_only


def test_unevaluable_rule_reported():
    rule = CelRule(rule="self.undefinedFunction(1)", message="", schema={"type": "object"})
    assert "could not be evaluated" in evaluate_rule(rule, {})


def test_uncompilable_rule_reported():
    rule = CelRule(rule="self.(", message="", schema={"type": "object"})
    assert "could not be compiled" in evaluate_rule(rule, {})


def test_strict_has_missing_parent():
    rule = CelRule(rule="!has(self.a.b)", message="", schema={"type": "object"})
    assert "could not be evaluated" in evaluate_rule(rule, {})


def test_has_missing_field_false():
    rule = CelRule(rule="!has(self.a.b)", message="b is set", schema={"type": "object"})
    assert evaluate_rule(rule, {"a": {}}) is None


def test_int_or_string_inequality():
    rule = CelRule(rule="self.port != 0", message="Port is required", schema={"type": "object"})
    assert evaluate_rule(rule, {"port": "metrics"}) is None
    assert evaluate_rule(rule, {"port": 0}) == "Port is required"


def test_durations_compare_by_value():
    schema = {"type": "object", "properties": {"timeout": {"type": "string", "format": "duration"}, "interval": {"type": "string", "format": "duration"}}}
    rule = CelRule(rule="self.timeout <= self.interval", message="timeout above interval", schema=schema)
    assert evaluate_rule(rule, {"timeout": "10s", "interval": "1m"}) is None
    assert evaluate_rule(rule, {"timeout": "2m", "interval": "90s"}) == "timeout above interval"


def test_escaped_property_names():
    schema = {"type": "object", "properties": {"namespace": {"type": "string"}}}
    rule = CelRule(rule="!has(self.__namespace__)", message="namespace not allowed", schema=schema)
    assert evaluate_rule(rule, {"namespace": "x"}) == "namespace not allowed"
    assert evaluate_rule(rule, {}) is None


def test_is_url_function():
    rule = CelRule(rule="isURL(self.url)", message="invalid URL", schema={"type": "object"})
    assert evaluate_rule(rule, {"url": "http://proxy:3128"}) is None
    assert evaluate_rule(rule, {"url": "not a url"}) == "invalid URL"


def test_go_duration_parse():
    assert parse_go_duration("1h30m").total_seconds() == 5400
    with pytest.raises(ValueError):
        parse_go_duration("30 seconds")
