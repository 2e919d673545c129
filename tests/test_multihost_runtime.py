"""The multi-host runtime with real JAX processes on CPU: forming, timing out, joining late.

Each test starts this file as a worker program (`python test_multihost_runtime.py worker`)
in several processes with the environment the chart gives a pod. The worker joins the JAX
runtime through distill.runtime, feeds its own row range of one global batch into a global
array and prints a JSON result with the global loss of a small jitted model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

THIS_FILE = Path(__file__).resolve()

GLOBAL_BATCH = 8
FEATURES = 16

# The same float32 reduction over a different sharding may round differently.
LOSS_TOLERANCE = 1e-5

# Seconds a worker process needs beyond its runtime timeout to import JAX and exit
# (an estimate for a loaded 2-core machine).
STARTUP_MARGIN_SECONDS = 25


def _worker_main(timeout_seconds: int) -> int:
    """Join the runtime that the environment describes, compute a global loss and print it as JSON."""
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
    from distill.config import ConfigError, RuntimeConfig
    from distill.exitcodes import DistillError, ExitCode
    from distill.runtime import detect_layout, initialize_runtime

    # The same mapping of errors to exit codes as the distill command line.
    try:
        layout = detect_layout(RuntimeConfig(), os.environ)
        initialize_runtime(layout, timeout_seconds)
    except ConfigError as error:
        print(f"error: {error}", flush=True)
        return int(ExitCode.INVALID_CONFIG)
    except DistillError as error:
        print(f"error: {error}", flush=True)
        return int(error.exit_code)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    rng = np.random.default_rng(0)
    batch = rng.normal(size=(GLOBAL_BATCH, FEATURES)).astype(np.float32)
    weights = rng.normal(size=(FEATURES, FEATURES)).astype(np.float32)

    # The data split of the training loop: process p keeps rows [p*B/P, (p+1)*B/P).
    p, n = layout.process_id, layout.num_processes
    local_rows = batch[p * GLOBAL_BATCH // n:(p + 1) * GLOBAL_BATCH // n]
    mesh = Mesh(np.array(jax.devices()), ("data",))
    global_batch = jax.make_array_from_process_local_data(
        NamedSharding(mesh, PartitionSpec("data")), local_rows, (GLOBAL_BATCH, FEATURES)
    )

    def loss_fn(w, x):
        return jnp.mean(jnp.tanh(x @ w) ** 2)

    loss, grad = jax.jit(jax.value_and_grad(loss_fn))(jnp.asarray(weights), global_batch)
    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "global_devices": jax.device_count(),
        "local_rows": int(local_rows.shape[0]),
        "loss": float(loss),
        "grad_norm": float(jnp.linalg.norm(grad)),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_env(worker: int, port: int, *, hosts: int = 2, slice_index: int = 0, slices: int = 1,
               host: str = "127.0.0.1") -> dict[str, str]:
    """Return the environment of one worker pod, with the coordinator on loopback."""
    env = dict(os.environ)
    env.update({
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
        "DISTILL_WORKER_INDEX": str(worker),
        "DISTILL_SLICE_INDEX": str(slice_index),
        "DISTILL_NUM_SLICES": str(slices),
        "DISTILL_HOSTS_PER_SLICE": str(hosts),
        "DISTILL_ACCELERATOR": "cpu",
        "DISTILL_TPU_TYPE": "",
        "DISTILL_COORDINATOR_ADDRESS": f"{host}:{port}",
        "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
    })
    return env


class Worker:
    """One worker process and what it printed."""

    def __init__(self, env: dict[str, str], timeout_seconds: int, prefix: list[str] | None = None) -> None:
        command = [*(prefix or []), "nice", sys.executable, str(THIS_FILE), "worker", str(timeout_seconds)]
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output = ""
        self.elapsed = 0.0

    def wait(self, limit: float) -> int:
        try:
            self.output, _ = self.process.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.output, _ = self.process.communicate()
            pytest.fail(f"worker still running after {limit:.0f} s:\n{self.output}")
        self.elapsed = time.monotonic() - self.started
        return self.process.returncode

    @property
    def result(self) -> dict:
        lines = [line for line in self.output.splitlines() if line.startswith("RESULT ")]
        assert lines, f"worker printed no result:\n{self.output}"
        return json.loads(lines[-1][len("RESULT "):])


def run_single() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for name in list(env):
        if name.startswith("DISTILL_"):
            del env[name]
    worker = Worker(env, timeout_seconds=30)
    assert worker.wait(120) == 0, worker.output
    return worker.result


@pytest.fixture(scope="module")
def single_result() -> dict:
    return run_single()


def test_runtime_two_workers_match_single(single_result):
    port = free_port()
    workers = [Worker(worker_env(i, port), timeout_seconds=60) for i in range(2)]
    codes = [worker.wait(180) for worker in workers]
    assert codes == [0, 0], "\n".join(worker.output for worker in workers)

    results = [worker.result for worker in workers]
    assert sorted(r["process_index"] for r in results) == [0, 1]
    assert all(r["process_count"] == 2 for r in results)
    assert all(r["global_devices"] == 2 for r in results)
    assert sum(r["local_rows"] for r in results) == single_result["local_rows"] == GLOBAL_BATCH
    for r in results:
        assert abs(r["loss"] - single_result["loss"]) <= LOSS_TOLERANCE
        assert abs(r["grad_norm"] - single_result["grad_norm"]) <= LOSS_TOLERANCE


def test_runtime_two_slices_one_host_each(single_result):
    port = free_port()
    workers = [Worker(worker_env(0, port, hosts=1, slice_index=s, slices=2), timeout_seconds=60) for s in range(2)]
    codes = [worker.wait(180) for worker in workers]
    assert codes == [0, 0], "\n".join(worker.output for worker in workers)

    results = [worker.result for worker in workers]
    assert [r["process_index"] for r in results] == [0, 1]
    assert all(r["process_count"] == 2 for r in results)
    for r in results:
        assert abs(r["loss"] - single_result["loss"]) <= LOSS_TOLERANCE


def test_runtime_missing_coordinator_retriable():
    port = free_port()
    timeout = 6
    worker = Worker(worker_env(1, port), timeout_seconds=timeout)
    code = worker.wait(timeout + 120)
    assert code == 75, worker.output
    assert worker.elapsed < timeout + STARTUP_MARGIN_SECONDS
    assert f"coordinator 127.0.0.1:{port}" in worker.output
    assert "of 2 workers" in worker.output
    assert "Traceback" not in worker.output


def test_runtime_missing_peer_retriable():
    port = free_port()
    timeout = 6
    worker = Worker(worker_env(0, port), timeout_seconds=timeout)
    code = worker.wait(timeout + 120)
    assert code == 75, worker.output
    assert worker.elapsed < timeout + STARTUP_MARGIN_SECONDS
    assert "expected 2 workers but process ids [1] did not join" in worker.output
    assert f"coordinator 127.0.0.1:{port}" in worker.output


def test_runtime_layout_mismatch_rejected():
    port = free_port()
    coordinator = Worker(worker_env(0, port, hosts=2), timeout_seconds=30)
    stranger = Worker(worker_env(1, port, hosts=3), timeout_seconds=30)
    codes = [coordinator.wait(120), stranger.wait(120)]
    # Pods rendered from different values cannot form a run, and restarting cannot fix that.
    assert codes == [2, 2], coordinator.output + stranger.output
    assert "process 1 expects 3 workers but the coordinator expects 2" in coordinator.output
    assert "rendezvous rejected by coordinator" in stranger.output


def listening_addresses(port: int) -> set[str]:
    """Return the local addresses (hex, as /proc/net/tcp* write them) that listen on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":
                found.add(address)
    return found


def test_runtime_loopback_coordinator_binds_loopback(single_result):
    port = free_port()
    envs = [worker_env(i, port) for i in range(2)]
    for env in envs:
        del env["JAX_COORDINATOR_BIND_ADDRESS"]

    # Alone, process 0 waits at the rendezvous, listening on the coordinator port.
    lonely = Worker(envs[0], timeout_seconds=15)
    deadline = time.monotonic() + 60
    addresses: set[str] = set()
    while not addresses and time.monotonic() < deadline and lonely.process.poll() is None:
        addresses = listening_addresses(port)
        time.sleep(0.2)
    assert lonely.wait(120) == 75, lonely.output
    # 127.0.0.1 in /proc/net/tcp's little-endian hex; no wildcard or other interface.
    assert addresses == {"0100007F"}

    # Both together form the run with JAX's coordinator on loopback too.
    workers = [Worker(env, timeout_seconds=60) for env in envs]
    codes = [worker.wait(180) for worker in workers]
    assert codes == [0, 0], "\n".join(worker.output for worker in workers)
    assert abs(workers[0].result["loss"] - single_result["loss"]) <= LOSS_TOLERANCE


def test_runtime_late_coordinator_forms(single_result):
    port = free_port()
    late = Worker(worker_env(1, port), timeout_seconds=90)
    time.sleep(20)
    coordinator = Worker(worker_env(0, port), timeout_seconds=90)
    codes = [coordinator.wait(180), late.wait(180)]
    assert codes == [0, 0], coordinator.output + late.output
    assert "not reachable yet" in late.output
    assert late.elapsed >= 20
    assert abs(late.result["loss"] - single_result["loss"]) <= LOSS_TOLERANCE


def _private_hosts_prefix(hosts_file: Path, nsswitch_file: Path) -> list[str] | None:
    """Return a command prefix that runs a process with its own /etc/hosts, or None if unavailable.

    A private mount namespace (unshare) bind-mounts test files over /etc/hosts and
    /etc/nsswitch.conf ("hosts: files"), so a name resolves only once the test adds it,
    and no lookup leaves the machine.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    script = (
        f"mount --bind {hosts_file} /etc/hosts && mount --bind {nsswitch_file} /etc/nsswitch.conf && exec \"$@\""
    )
    prefix = [unshare, "--mount", "--map-root-user", "sh", "-c", script, "sh"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30)
    return prefix if probe.returncode == 0 else None


def test_runtime_coordinator_dns_late(tmp_path, single_result):
    hosts_file = tmp_path / "hosts"
    nsswitch_file = tmp_path / "nsswitch.conf"
    hosts_file.write_text(f"127.0.0.1 localhost {socket.gethostname()}\n", encoding="utf-8")
    nsswitch_file.write_text("hosts: files\n", encoding="utf-8")
    prefix = _private_hosts_prefix(hosts_file, nsswitch_file)
    if prefix is None:
        pytest.skip("unshare cannot create a mount namespace here (needs root or user namespaces)")

    name = "exp-workers-0-0.exp"
    port = free_port()
    workers = [Worker(worker_env(i, port, host=name), timeout_seconds=90, prefix=prefix) for i in range(2)]
    time.sleep(8)
    with open(hosts_file, "a", encoding="utf-8") as hosts:
        hosts.write(f"127.0.0.1 {name}\n")

    codes = [worker.wait(180) for worker in workers]
    assert codes == [0, 0], "\n".join(worker.output for worker in workers)
    assert all("does not resolve yet" in worker.output for worker in workers)
    assert all(f"{name} resolves after" in worker.output for worker in workers)
    assert abs(workers[1].result["loss"] - single_result["loss"]) <= LOSS_TOLERANCE


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    sys.exit(_worker_main(int(sys.argv[2])))
