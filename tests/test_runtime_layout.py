"""detect_layout: the process layout from pod environments of the chart, GKE and JobSet."""

from __future__ import annotations

import logging

import pytest

from distill.config import ConfigError, RuntimeConfig
from distill.runtime import coordinator_bind_address, detect_layout


def chart_env(worker: int, slice_index: int = 0, slices: int = 1, hosts: int = 2, **extra: str) -> dict[str, str]:
    """Return the DISTILL_* variables the chart sets on a CPU worker pod."""
    env = {
        "DISTILL_EXPERIMENT": "exp",
        "DISTILL_WORKER_INDEX": str(worker),
        "DISTILL_SLICE_INDEX": str(slice_index),
        "DISTILL_NUM_SLICES": str(slices),
        "DISTILL_HOSTS_PER_SLICE": str(hosts),
        "DISTILL_ACCELERATOR": "cpu",
        "DISTILL_TPU_TYPE": "",
        "DISTILL_COORDINATOR_ADDRESS": "exp-workers-0-0.exp:8476",
    }
    env.update(extra)
    return env


def test_layout_chart_cpu_worker():
    layout = detect_layout(RuntimeConfig(), chart_env(worker=1))
    assert layout.process_id == 1
    assert layout.num_processes == 2
    assert layout.worker_index == 1
    assert layout.hosts_per_slice == 2
    assert layout.slice_index == 0
    assert layout.num_slices == 1
    assert layout.accelerator == "cpu"
    assert layout.tpu_type is None
    assert layout.coordinator_address == "exp-workers-0-0.exp:8476"
    assert layout.is_writer is False


def test_layout_writer_is_process_zero():
    layout = detect_layout(RuntimeConfig(), chart_env(worker=0))
    assert layout.process_id == 0
    assert layout.is_writer is True


def test_layout_process_ids_across_slices():
    seen = []
    for slice_index in range(3):
        for worker in range(4):
            layout = detect_layout(RuntimeConfig(), chart_env(worker, slice_index, slices=3, hosts=4))
            assert layout.num_processes == 12
            assert layout.process_id == slice_index * 4 + worker
            seen.append(layout.process_id)
    assert sorted(seen) == list(range(12))


def test_layout_gke_tpu_multislice_variables():
    environ = {
        "TPU_WORKER_ID": "2",
        "TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3",
        "MEGASCALE_SLICE_ID": "1",
        "MEGASCALE_NUM_SLICES": "2",
        "MEGASCALE_COORDINATOR_ADDRESS": "h0",
    }
    layout = detect_layout(RuntimeConfig(), environ)
    assert layout.accelerator == "tpu"
    assert layout.worker_index == 2
    assert layout.hosts_per_slice == 4
    assert layout.slice_index == 1
    assert layout.num_slices == 2
    assert layout.process_id == 6
    assert layout.num_processes == 8
    # JAX finds the coordinator from TPU_WORKER_HOSTNAMES / MEGASCALE_* itself.
    assert layout.coordinator_address is None


def test_layout_chart_tpu_pod_hosts_from_table():
    environ = {
        "DISTILL_WORKER_INDEX": "5",
        "DISTILL_SLICE_INDEX": "0",
        "DISTILL_NUM_SLICES": "1",
        "DISTILL_ACCELERATOR": "tpu",
        "DISTILL_TPU_TYPE": "v4-64",
        "DISTILL_COORDINATOR_ADDRESS": "",
    }
    layout = detect_layout(RuntimeConfig(), environ)
    assert layout.tpu_type == "v4-64"
    assert layout.hosts_per_slice == 8
    assert layout.process_id == 5
    assert layout.coordinator_address is None


def test_layout_job_completion_index_fallback():
    environ = {"JOB_COMPLETION_INDEX": "3", "DISTILL_HOSTS_PER_SLICE": "4", "DISTILL_COORDINATOR_ADDRESS": "c:1"}
    layout = detect_layout(RuntimeConfig(), environ)
    assert layout.worker_index == 3
    assert layout.process_id == 3


def test_layout_distill_variables_win_over_gke():
    environ = chart_env(worker=1, TPU_WORKER_ID="0", JOB_COMPLETION_INDEX="0")
    layout = detect_layout(RuntimeConfig(), environ)
    assert layout.worker_index == 1


def test_layout_environment_overrides_config():
    config = RuntimeConfig(coordinator_address="127.0.0.1:1234", num_processes=4, process_id=3)
    layout = detect_layout(config, chart_env(worker=1))
    assert layout.process_id == 1
    assert layout.num_processes == 2
    assert layout.coordinator_address == "exp-workers-0-0.exp:8476"


def test_layout_config_only_cpu_run():
    config = RuntimeConfig(coordinator_address="127.0.0.1:1234", num_processes=3, process_id=2)
    layout = detect_layout(config, {})
    assert layout.process_id == 2
    assert layout.num_processes == 3
    assert layout.coordinator_address == "127.0.0.1:1234"
    assert layout.accelerator == "cpu"


def test_layout_plain_single_process():
    layout = detect_layout(RuntimeConfig(), {})
    assert layout.process_id == 0
    assert layout.num_processes == 1
    assert layout.coordinator_address is None
    assert layout.is_writer is True


def test_layout_logs_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="distill.runtime"):
        detect_layout(RuntimeConfig(), chart_env(worker=1))
    lines = [record.getMessage() for record in caplog.records if record.name == "distill.runtime"]
    assert len(lines) == 1
    assert "process 1 of 2" in lines[0]
    assert "worker 1 of 2 in slice 0 of 1" in lines[0]
    assert "exp-workers-0-0.exp:8476" in lines[0]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (chart_env(worker="x"), "DISTILL_WORKER_INDEX='x' is not an integer"),
        (chart_env(worker=-1), "DISTILL_WORKER_INDEX=-1 is below 0"),
        (chart_env(worker=2), "worker index 2"),
        (chart_env(worker=0, slice_index=1, slices=1), "slice index 1"),
        (chart_env(worker=0, DISTILL_ACCELERATOR="gpu"), "DISTILL_ACCELERATOR='gpu' is invalid"),
        (chart_env(worker=0, DISTILL_COORDINATOR_ADDRESS=""), "no coordinator address"),
        (chart_env(worker=0, DISTILL_COORDINATOR_ADDRESS="exp-workers-0-0"), "is not host:port"),
        (
            chart_env(worker=0, hosts=4, DISTILL_ACCELERATOR="tpu", DISTILL_TPU_TYPE="v4-64"),
            "gives 4 hosts per slice but a v4-64 slice has 8 hosts",
        ),
        (chart_env(worker=0, DISTILL_ACCELERATOR="tpu", DISTILL_TPU_TYPE="v9-8"), "unknown TPU type 'v9-8'"),
    ],
    ids=["not-integer", "negative", "worker-too-large", "slice-too-large", "accelerator",
         "cpu-without-coordinator", "coordinator-without-port", "tpu-hosts-mismatch", "unknown-tpu-type"],
)
def test_layout_invalid_environment(environ, expected):
    with pytest.raises(ConfigError) as error:
        detect_layout(RuntimeConfig(), environ)
    assert expected in str(error.value)


@pytest.mark.parametrize(
    ("coordinator", "environ", "expected"),
    [
        ("exp-workers-0-0.exp:8476", {}, None),
        ("10.0.0.5:8476", {}, None),
        ("127.0.0.1:1234", {}, "127.0.0.1:1234"),
        ("localhost:1234", {}, "127.0.0.1:1234"),
        ("[::1]:1234", {}, "[::1]:1234"),
        ("exp-workers-0-0.exp:8476", {"JAX_COORDINATOR_BIND_ADDRESS": "127.0.0.1:9"}, "127.0.0.1:9"),
    ],
    ids=["pod-name", "pod-ip", "loopback", "localhost", "ipv6-loopback", "explicit"],
)
def test_bind_address_cases(coordinator, environ, expected):
    assert coordinator_bind_address(coordinator, environ) == expected
