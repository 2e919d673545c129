"""The local JobSet runner on the chart's rendered JobSet, with a probe in place of `distill train`.

The probe (this file run as `python test_localjobset.py probe train CONFIG`) loads the mounted
config with distill's own loader, joins the JAX runtime through distill.runtime, serves its
metrics port and prints what the pod saw. Exit codes for the failure-policy tests come from
PROBE_* variables set with the runner's --env option.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helm_render import render, template

THIS_FILE = Path(__file__).resolve()
REPO_ROOT = THIS_FILE.parent.parent
DISTILL = Path(sys.executable).with_name("distill")

RUNNER_LIMIT_SECONDS = 240


def _probe_main(config_path: str) -> int:
    """Act as one worker pod: validate the config, join the runtime, report what the pod saw."""
    import logging
    import socket
    import urllib.request

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
    from distill.config import load_config
    from distill.exitcodes import DistillError
    from distill.runtime import detect_layout, initialize_runtime

    hostname = os.environ["HOSTNAME"]
    fail_pod = os.environ.get("PROBE_FAIL_POD")
    if fail_pod == hostname:
        marker = Path(os.environ.get("PROBE_MARKER", "/nonexistent"))
        if os.environ.get("PROBE_FAIL_ONCE") != "1" or not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            if os.environ.get("PROBE_FAIL_ONCE") == "1":
                marker.write_text("failed once\n", encoding="utf-8")
            code = int(os.environ["PROBE_EXIT_CODE"])
            print(f"probe: {hostname} exits with code {code} on purpose", flush=True)
            return code

    config = load_config(config_path)
    try:
        layout = detect_layout(config.runtime, os.environ)
        initialize_runtime(layout, config.runtime.initialization_timeout_seconds)
    except DistillError as error:
        print(f"error: {error}", flush=True)
        return int(error.exit_code)

    import jax

    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    Gauge("probe_up", "Probe pod is up.", ["worker"], registry=registry).labels(str(layout.process_id)).set(1)
    server, _thread = start_http_server(config.metrics.port, addr=config.metrics.host, registry=registry)
    with urllib.request.urlopen(f"http://{config.metrics.host}:{config.metrics.port}/metrics", timeout=10) as response:
        scraped = response.read().decode()
    server.shutdown()

    result = {
        "hostname": hostname,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "layout_process_id": layout.process_id,
        "metrics_host": config.metrics.host,
        "metrics_port": config.metrics.port,
        "metrics_served": f'probe_up{{worker="{layout.process_id}"}} 1.0' in scraped,
        "save_directory": config.training.save_directory,
        "max_training_steps": config.training.max_training_steps,
        "config_path": config_path,
        "home": os.environ.get("HOME"),
        "tmpdir": os.environ.get("TMPDIR"),
        "coordinator": os.environ.get("DISTILL_COORDINATOR_ADDRESS"),
        "job_completion_index": os.environ.get("JOB_COMPLETION_INDEX"),
        "restart_attempt": os.environ.get("DISTILL_RESTART_ATTEMPT"),
        "gethostname": socket.gethostname(),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def rendered_with_probe(tmp_path: Path, values: dict | None = None, scenario: str = "cpu-smoke.yaml") -> Path:
    """Render the chart scenario and swap the container's `distill` command for the probe."""
    documents = [d for d in yaml.safe_load_all(template(scenario, values)) if d]
    jobset = next(d for d in documents if d["kind"] == "JobSet")
    for replicated in jobset["spec"]["replicatedJobs"]:
        container = replicated["template"]["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["distill"]
        assert container["args"] == ["train", "/etc/distill/config.yaml"]
        container["command"] = [sys.executable, str(THIS_FILE), "probe"]
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(documents), encoding="utf-8")
    return path


def run_runner(rendered: Path, state_dir: Path, *options: str) -> subprocess.CompletedProcess[str]:
    command = ["nice", str(DISTILL), "local-jobset", str(rendered), "--state-dir", str(state_dir),
               "--workdir", str(REPO_ROOT), "--grace-seconds", "5", "--timeout", "200", *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=RUNNER_LIMIT_SECONDS)


def results(output: str) -> dict[str, dict]:
    """Return the probe results by hostname, from the runner's prefixed pod output."""
    found = {}
    for line in output.splitlines():
        if "] RESULT " in line:
            payload = json.loads(line.split("] RESULT ", 1)[1])
            found[payload["hostname"]] = payload
    return found


POD0 = "exp-distill-workers-0-0"
POD1 = "exp-distill-workers-0-1"


def test_localjobset_chart_runs_two_pods(tmp_path):
    values = {"config": {"training": {"save_directory": "gs://example-bucket/runs/smoke"}}}
    rendered = rendered_with_probe(tmp_path, values)
    state = tmp_path / "state"
    run = run_runner(rendered, state, "--set", "training.max_training_steps=3")
    assert run.returncode == 0, run.stdout + run.stderr

    found = results(run.stdout)
    assert sorted(found) == [POD0, POD1]
    assert sorted(r["process_index"] for r in found.values()) == [0, 1]
    assert all(r["process_count"] == 2 for r in found.values())
    assert found[POD1]["layout_process_id"] == 1
    assert found[POD1]["job_completion_index"] == "1"
    assert found[POD0]["restart_attempt"] == "0"


def test_localjobset_pod_output_prefixed(tmp_path):
    rendered = rendered_with_probe(tmp_path)
    run = run_runner(rendered, tmp_path / "state")
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"[{POD0}] distill.runtime: process layout: process 0 of 2" in run.stdout
    assert f"[{POD1}] distill.runtime: process layout: process 1 of 2" in run.stdout
    assert "JobSet exp-distill completed after 0 restart(s)" in run.stderr
    assert (tmp_path / "state" / "attempt-0" / POD1 / "log.txt").read_text().count("RESULT ") == 1


def test_localjobset_rewrites_addresses_and_paths(tmp_path):
    values = {"config": {"training": {"save_directory": "gs://example-bucket/runs/smoke"}}}
    rendered = rendered_with_probe(tmp_path, values)
    state = (tmp_path / "state").resolve()
    run = run_runner(rendered, state, "--set", "training.max_training_steps=3")
    assert run.returncode == 0, run.stdout + run.stderr
    found = results(run.stdout)
    first, second = found[POD0], found[POD1]

    # Hostnames map to loopback and every pod's ports get their own local numbers.
    assert first["coordinator"] == second["coordinator"]
    assert first["coordinator"].startswith("127.0.0.1:")
    assert first["coordinator"] != "127.0.0.1:8476"
    assert first["metrics_port"] != second["metrics_port"]
    assert 9400 not in (first["metrics_port"], second["metrics_port"])
    assert first["metrics_host"] == "127.0.0.1"
    assert first["metrics_served"] is True
    assert second["metrics_served"] is True

    # The ConfigMap is mounted per pod and /etc/distill is rewritten to it.
    assert first["config_path"] == str(state / "attempt-0" / POD0 / "volumes" / "config" / "config.yaml")
    assert first["max_training_steps"] == 3
    # emptyDir mounts (/cache as HOME, /tmp) are per-pod folders.
    assert first["home"] == str(state / "attempt-0" / POD0 / "volumes" / "cache")
    assert second["tmpdir"] == str(state / "attempt-0" / POD1 / "volumes" / "tmp")
    # A gs:// save_directory moves to one local folder shared by all pods, and the runner logs the move.
    assert first["save_directory"] == second["save_directory"] == str(state / "gcs" / "example-bucket" / "runs" / "smoke")
    assert "training.save_directory gs://example-bucket/runs/smoke ->" in run.stderr


def test_localjobset_late_coordinator_pod(tmp_path):
    rendered = rendered_with_probe(tmp_path)
    run = run_runner(rendered, tmp_path / "state", "--delay", "0-0=20")
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"pod {POD0} starts 20 s late (--delay)" in run.stderr
    assert f"[{POD1}] distill.rendezvous: rendezvous: coordinator 127.0.0.1:" in run.stdout
    assert "not reachable yet" in run.stdout
    assert sorted(results(run.stdout)) == [POD0, POD1]


def test_localjobset_sigterm_stops_pods(tmp_path):
    rendered = rendered_with_probe(tmp_path)
    command = ["nice", str(DISTILL), "local-jobset", str(rendered), "--state-dir", str(tmp_path / "state"),
               "--workdir", str(REPO_ROOT), "--grace-seconds", "5", "--timeout", "200", "--delay", "0-0=120"]
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = None
    deadline = time.monotonic() + 60
    try:
        for line in runner.stderr:
            match = re.search(rf"pod {POD1} started \(pid (\d+)\)", line)
            if match:
                pid = int(match.group(1))
                break
            assert time.monotonic() < deadline, "the runner did not start the pod in time"
        assert pid is not None
        runner.send_signal(signal.SIGTERM)
        _, rest = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert runner.returncode == 143
    assert "the runner received SIGTERM" in rest
    assert f"pod {POD1} stopped" in rest
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_localjobset_invalid_config_fails_at_once(tmp_path):
    rendered = rendered_with_probe(tmp_path)
    started = time.monotonic()
    run = run_runner(rendered, tmp_path / "state", "--env", f"PROBE_FAIL_POD={POD1}", "--env", "PROBE_EXIT_CODE=2")
    assert run.returncode == 2, run.stdout + run.stderr
    assert "rule at index 0 -> FailJob" in run.stderr
    assert "reason PodFailurePolicy" in run.stderr
    assert "rule fail-on-invalid-config-or-input -> FailJobSet" in run.stderr
    assert f"pod {POD0} stopped" in run.stderr
    assert not (tmp_path / "state" / "attempt-1").exists()
    assert time.monotonic() - started < 120


def test_localjobset_retriable_failure_restarts_all(tmp_path):
    rendered = rendered_with_probe(tmp_path)
    marker = tmp_path / "failed-once"
    run = run_runner(
        rendered, tmp_path / "state",
        "--env", f"PROBE_FAIL_POD={POD1}", "--env", "PROBE_EXIT_CODE=75",
        "--env", "PROBE_FAIL_ONCE=1", "--env", f"PROBE_MARKER={marker}",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "reason BackoffLimitExceeded" in run.stderr
    assert "rule restart-on-retriable-failure -> RestartJobSet" in run.stderr
    assert "restart 1 of maxRestarts 3" in run.stderr
    assert f"pod {POD0} stopped" in run.stderr
    assert (tmp_path / "state" / "attempt-1" / POD0).is_dir()
    found = results(run.stdout)
    assert sorted(found) == [POD0, POD1]
    # The pods of the second start see JobSet's restart-attempt annotation through the chart's env.
    assert found[POD0]["restart_attempt"] == "1"
    assert found[POD1]["restart_attempt"] == "1"
    assert "JobSet exp-distill completed after 1 restart(s)" in run.stderr


def test_localjobset_max_restarts_exhausted(tmp_path):
    rendered = rendered_with_probe(tmp_path, {"jobset": {"maxRestarts": 1}})
    run = run_runner(rendered, tmp_path / "state", "--env", f"PROBE_FAIL_POD={POD0}", "--env", "PROBE_EXIT_CODE=1")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "restart 1 of maxRestarts 1" in run.stderr
    assert "1 restart(s) used of maxRestarts 1" in run.stderr
    assert (tmp_path / "state" / "attempt-1").is_dir()
    assert not (tmp_path / "state" / "attempt-2").exists()


def test_localjobset_rejects_tpu_pods(tmp_path):
    rendered = tmp_path / "tpu.yaml"
    rendered.write_text(template("v4-8-single-host.yaml"), encoding="utf-8")
    run = run_runner(rendered, tmp_path / "state")
    assert run.returncode == 2
    assert "requests google.com/tpu" in run.stderr
    assert "accelerator: cpu" in run.stderr


def test_localjobset_rejects_missing_jobset(tmp_path):
    rendered = tmp_path / "empty.yaml"
    rendered.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}), encoding="utf-8")
    run = run_runner(rendered, tmp_path / "state")
    assert run.returncode == 2
    assert "found 0 JobSet objects" in run.stderr


def test_localjobset_help_without_jax():
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "distill", "local-jobset", "--help"],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "--delay" in run.stdout
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if "|" in line}
    assert "jax" not in imported


def test_localjobset_parses_rendered_pods():
    # Pure expansion check on the TPU scenario, which the runner parses but will not start.
    from distill.jobset import parse_jobset

    documents = render("v6e-256-two-slices.yaml")
    manifest = next(d for d in documents if d["kind"] == "JobSet")
    jobset = parse_jobset(documents)
    hostnames = jobset.hostnames()
    assert len(hostnames) == 128
    assert hostnames[0] == "exp-distill-workers-0-0"
    assert hostnames[-1] == "exp-distill-workers-1-63"
    assert [job.name for job in jobset.jobs] == ["exp-distill-workers-0", "exp-distill-workers-1"]
    assert jobset.pods[64].job_global_index == 1
    assert jobset.max_restarts == manifest["spec"]["failurePolicy"]["maxRestarts"]


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1:3] == ["probe", "train"]:
    sys.exit(_probe_main(sys.argv[3]))
