"""Values handling of the chart: bad values fail with their own message, every TPU type renders."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distill.topology import load_topology_table
from helm_render import REPO_ROOT, find, render, render_error, worker_container, worker_job

# (case id, override values on top of the chart defaults, fragments the error must contain)
BAD_VALUES = [
    (
        "misspelled-nested-key",
        {"config": {"training": {"learning_rat": 0.1}}},
        ["/config/training", "additional properties 'learning_rat' not allowed"],
    ),
    (
        "misspelled-top-level-key",
        {"tpus": {"type": "v4-8"}},
        ["additional properties 'tpus' not allowed"],
    ),
    (
        "unknown-tpu-type",
        {"tpu": {"type": "v4-63"}},
        ['tpu.type="v4-63" is not a known TPU type', "use one of:", "v4-64", "v6e-256"],
    ),
    (
        "inconsistent-topology",
        {"tpu": {"type": "v4-64", "topology": "4x4x4"}},
        ['tpu.topology="4x4x4" is inconsistent with tpu.type="v4-64"', "topology is 2x4x4", "v4-128"],
    ),
    (
        "zero-slices",
        {"tpu": {"slices": 0}},
        ["/tpu/slices", "minimum: got 0, want 1"],
    ),
    (
        "alpha-two",
        {"config": {"distillation": {"alpha": 2}}},
        ["/config/distillation/alpha", "maximum: got 2, want 1"],
    ),
    (
        "stream-without-step-counts",
        {"config": {"training": {"per_epoch_training_steps": None}}},
        ["config.data.streaming is true but neither config.training.max_training_steps"],
    ),
    (
        "inline-token-key",
        {"secrets": {"huggingFace": {"token": "hf_notARealToken123"}}},
        ["/secrets/huggingFace", "additional properties 'token' not allowed"],
    ),
    (
        "inline-token-as-secret-name",
        {"secrets": {"wandb": {"secretName": "0123456789abcdef_NOT_A_KEY"}}},
        ["secrets.wandb.secretName is not a Secret name", "kubectl create secret generic"],
    ),
    (
        "batch-not-divisible",
        {"config": {"training": {"total_batch_size": 48}}},
        ["config.training.total_batch_size=48 is not divisible by the data-parallel size 32", "such as 64"],
    ),
    (
        "tensor-parallel-not-divisor",
        {"config": {"mesh": {"tensor_parallel_size": 3}}},
        ["config.mesh.tensor_parallel_size=3 does not divide the 32 devices"],
    ),
    (
        "metrics-port-zero",
        {"config": {"metrics": {"port": 0}}},
        ["config.metrics.port=0 picks a random port"],
    ),
    (
        "wrong-type",
        {"tpu": {"slices": "two"}},
        ["/tpu/slices", "got string, want integer"],
    ),
]


@pytest.mark.parametrize(("values", "fragments"), [case[1:] for case in BAD_VALUES], ids=[case[0] for case in BAD_VALUES])
def test_bad_values_rejected(values, fragments):
    message = render_error(values=values)
    for fragment in fragments:
        assert fragment in message


def test_bad_values_messages_distinct():
    messages = [render_error(values=values) for _, values, _ in BAD_VALUES]
    assert len(set(messages)) == len(messages)


def test_inline_token_not_echoed():
    message = render_error(values={"secrets": {"wandb": {"secretName": "0123456789abcdef_NOT_A_KEY"}}})
    assert "0123456789abcdef_NOT_A_KEY" not in message


def test_long_release_name_rejected():
    with pytest.raises(Exception, match="pod hostnames need at most 40"):
        render(release="a-very-long-release-name-for-an-experiment")


def test_topology_override_consistent_accepted():
    objects = render(values={"tpu": {"type": "v4-64", "topology": "2x4x4"}})
    pod = worker_job(objects)["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x4x4"


def test_tensor_parallel_changes_data_parallel():
    # 32 chips with tensor parallelism 2 leave a data-parallel size of 16, which divides 48.
    objects = render(values={"config": {"mesh": {"tensor_parallel_size": 2}, "training": {"total_batch_size": 48}}})
    assert find(objects, "JobSet")["kind"] == "JobSet"


@pytest.mark.parametrize("tpu_type", sorted(load_topology_table()))
def test_every_tpu_type_renders(tpu_type):
    expected = load_topology_table()[tpu_type]
    batch = expected.chips * 2
    objects = render(values={"tpu": {"type": tpu_type}, "config": {"training": {"total_batch_size": batch}}})
    job = worker_job(objects)
    pod = job["template"]["spec"]["template"]["spec"]
    resources = worker_container(objects)["resources"]
    assert job["template"]["spec"]["parallelism"] == expected.hosts
    assert resources["limits"]["google.com/tpu"] == expected.chips_per_host
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == expected.accelerator
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == expected.topology


@pytest.mark.parametrize("tpu_type", ["v5litepod-8", "v6e-8", "v6e-1"])
def test_ambiguous_shapes_pin_machine_type(tpu_type):
    objects = render(values={"tpu": {"type": tpu_type}, "config": {"training": {"total_batch_size": 8}}})
    pod = worker_job(objects)["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["node.kubernetes.io/instance-type"] == load_topology_table()[tpu_type].machine_type


def test_values_schema_matches_config_models():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gen-values-schema.py"), "--check"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr


def test_values_schema_closed_objects():
    schema = json.loads((REPO_ROOT / "helm" / "distill" / "values.schema.json").read_text(encoding="utf-8"))
    open_objects = []

    def visit(node, path):
        if not isinstance(node, dict):
            return
        if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
            open_objects.append(path)
        for key, child in node.get("properties", {}).items():
            visit(child, f"{path}.{key}")
        for key, child in node.get("$defs", {}).items():
            visit(child, f"$defs.{key}")

    visit(schema, "(root)")
    assert open_objects == []
