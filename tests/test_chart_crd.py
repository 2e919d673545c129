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


def _full_pod_monitoring() -> dict:
    """Return a valid PodMonitoring that reaches every CEL rule of the v1 schema."""
    secret = {"name": "scrape-auth", "key": "value"}
    return {
        "apiVersion": "monitoring.googleapis.com/v1",
        "kind": "PodMonitoring",
        "metadata": {"name": "distill"},
        "spec": {
            "selector": {"matchLabels": {"app": "distill"}},
            "targetLabels": {"fromPod": [{"from": "app", "to": "application"}]},
            "endpoints": [
                {
                    "port": "metrics",
                    "interval": "30s",
                    "timeout": "10s",
                    "proxyUrl": "http://proxy:3128",
                    "authorization": {"type": "Bearer", "credentials": {"secret": dict(secret)}},
                    "tls": {"ca": {"secret": dict(secret)}, "cert": {"secret": dict(secret)}, "key": {"secret": dict(secret)}},
                    "metricRelabeling": [
                        {"action": "labeldrop", "regex": "tmp_.*"},
                        {"action": "replace", "sourceLabels": ["a"], "targetLabel": "b"},
                    ],
                },
                {"port": 9400, "interval": "1m", "basicAuth": {"username": "u", "password": {"secret": dict(secret)}}},
                {
                    "port": 9401,
                    "interval": "1m",
                    "oauth2": {
                        "clientID": "c",
                        "clientSecret": {"secret": dict(secret)},
                        "tokenURL": "https://auth.example/token",
                        "proxyUrl": "http://proxy:3128",
                        "tlsConfig": {"cert": {"secret": dict(secret)}, "key": {"secret": dict(secret)}},
                    },
                },
            ],
        },
    }


def _set(obj: dict, path: tuple, value) -> dict:
    changed = copy.deepcopy(obj)
    target = changed
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return changed


_DELETE = object()
_ENDPOINT = ("spec", "endpoints", 0)

# (case id, path to change, new value, fragment of the expected violation)
POD_MONITORING_VIOLATIONS = [
    ("secret-namespace", (*_ENDPOINT, "authorization", "credentials", "secret", "namespace"), "other", "Namespace not allowed on PodMonitoring secret references"),
    ("basic-auth-namespace", ("spec", "endpoints", 1, "basicAuth", "password", "secret", "namespace"), "other", "Namespace not allowed on PodMonitoring secret references"),
    ("timeout-above-interval", (*_ENDPOINT, "timeout"), "1m", "self.timeout <= self.interval"),
    ("two-auth-methods", (*_ENDPOINT, "basicAuth"), {"username": "u"}, "has(self.authorization)"),
    ("authorization-type-basic", (*_ENDPOINT, "authorization", "type"), "Basic", "authorization.type: authorization type cannot be set to \"basic\""),
    ("labeldrop-without-regex", (*_ENDPOINT, "metricRelabeling", 0, "regex"), _DELETE, "labeldrop"),
    ("protected-target-label", (*_ENDPOINT, "metricRelabeling", 1, "targetLabel"), "cluster", "metricRelabeling[1].targetLabel: failed rule: self != 'project_id'"),
    ("protected-from-pod-label", ("spec", "targetLabels", "fromPod", 0, "to"), "namespace", "fromPod[0].to: failed rule: self != 'project_id'"),
    ("proxy-url-with-credentials", (*_ENDPOINT, "proxyUrl"), "http://user:pw@proxy:3128", "isURL(self)"),
    ("proxy-url-not-url", (*_ENDPOINT, "proxyUrl"), "proxy", "isURL(self)"),
    ("tls-cert-without-key", (*_ENDPOINT, "tls", "key"), _DELETE, "endpoints[0].tls: client cert and client key must be provided together"),
    ("oauth2-cert-without-key", ("spec", "endpoints", 2, "oauth2", "tlsConfig", "key"), _DELETE, "oauth2.tlsConfig: client cert and client key must be provided together"),
    ("port-zero", ("spec", "endpoints", 1, "port"), 0, "Port is required"),
]


def test_pod_monitoring_full_valid(crds):
    assert crds.validate(_full_pod_monitoring()) == []


@pytest.mark.parametrize(
    ("path", "value", "fragment"), [case[1:] for case in POD_MONITORING_VIOLATIONS], ids=[case[0] for case in POD_MONITORING_VIOLATIONS]
)
def test_pod_monitoring_violation(crds, path, value, fragment):
    problems = crds.validate(_set(_full_pod_monitoring(), path, value))
    assert len(problems) == 1, problems
    assert fragment in problems[0]


def test_rules_record_and_alert(crds):
    rules = {
        "apiVersion": "monitoring.googleapis.com/v1",
        "kind": "Rules",
        "metadata": {"name": "distill"},
        "spec": {"groups": [{"name": "g", "interval": "30s", "rules": [{"record": "a:b", "alert": "A", "expr": "up"}]}]},
    }
    problems = crds.validate(rules)
    assert len(problems) == 1
    assert "Must set exactly one of Record or Alert" in problems[0]


@pytest.mark.parametrize("kind", ["JobSet", "PodMonitoring", "Rules", "ServiceMonitor", "PodMonitor", "PrometheusRule"])
def test_create_rules_compile(crds, kind):
    # A CRD upgrade may add rules written in CEL that cel-python cannot parse; catch that here.
    import celpy

    versions = [crds.get(api_version, name) for api_version, name in crds.kinds() if name == kind]
    for crd in versions:
        for rule in _all_rules(crd.openapi):
            if rule.update_only:
                continue
            environment = celpy.Environment()
            assert environment.compile(rule.rule) is not None, rule.rule


def _all_rules(schema: dict):
    for entry in schema.get("x-kubernetes-validations", []):
        yield CelRule(rule=entry["rule"], message=entry.get("message", ""), schema=schema)
    for child in schema.get("properties", {}).values():
        yield from _all_rules(child)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _all_rules(schema[key])
