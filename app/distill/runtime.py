"""Multi-host runtime bootstrap: find this process's place in the run and join the JAX runtime.

Every pod of the JobSet runs the same entrypoint. `detect_layout` reads the pod's environment
(the chart's DISTILL_* variables, then what GKE and JobSet inject) and the config's `runtime`
section, and returns a `ProcessLayout` without touching JAX. `initialize_runtime` then starts
the JAX distributed runtime: explicitly with gloo collectives on CPU, and on TPU with the
coordinator that JAX's own GKE detection finds when the chart leaves the address empty.

Global process ids are unique across slices: slice_index * hosts_per_slice + worker_index,
which is also the order JAX's TPU cluster detection uses (jax 0.9.2, cloud_tpu_cluster.py).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

from distill.config import ConfigError, RuntimeConfig
from distill.exitcodes import RetriableError

logger = logging.getLogger(__name__)

ACCELERATORS = ("tpu", "cpu")

# Seconds between two DNS lookups of a coordinator name that does not resolve yet.
DNS_RETRY_SECONDS = 2.0

# Seconds between two "still waiting" log lines while the coordinator name does not resolve.
DNS_LOG_INTERVAL_SECONDS = 30.0

# Minimum time given to jax.distributed.initialize after the rendezvous (seconds).
JAX_MIN_INITIALIZATION_SECONDS = 30


@dataclass(frozen=True)
class ProcessLayout:
    """This process's place in a (possibly multi-slice) run."""

    process_id: int
    num_processes: int
    worker_index: int
    """Index of this pod within its slice (JOB_COMPLETION_INDEX on GKE)."""
    hosts_per_slice: int
    slice_index: int
    """Index of this slice (the JobSet's job index on GKE)."""
    num_slices: int
    coordinator_address: str | None
    """host:port of process 0; None on TPU lets JAX find it from TPU_WORKER_HOSTNAMES or MEGASCALE_*."""
    accelerator: str
    """'tpu' or 'cpu'."""
    tpu_type: str | None

    @property
    def is_writer(self) -> bool:
        """True on the one process that writes shared files (checkpoint metadata, final summary)."""
        return self.process_id == 0

    def describe(self) -> str:
        """Return the one-line description that the bootstrap logs."""
        coordinator = self.coordinator_address or "auto-detected by JAX"
        tpu = f" ({self.tpu_type})" if self.tpu_type else ""
        return (
            f"process {self.process_id} of {self.num_processes}: worker {self.worker_index} of "
            f"{self.hosts_per_slice} in slice {self.slice_index} of {self.num_slices}, "
            f"accelerator {self.accelerator}{tpu}, coordinator {coordinator}"
        )


def _read_int(environ: Mapping[str, str], name: str, *, minimum: int) -> int | None:
    """Return the integer value of environment variable `name`, or None when unset or empty."""
    raw = environ.get(name, "").strip()
    if raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer; set it to a whole number >= {minimum}") from None
    if value < minimum:
        raise ConfigError(f"environment variable {name}={value} is below {minimum}; set it to a whole number >= {minimum}")
    return value


def _read_str(environ: Mapping[str, str], name: str) -> str | None:
    raw = environ.get(name, "").strip()
    return raw or None


def _first(*candidates: tuple[str, int | None]) -> tuple[str, int] | None:
    """Return the first (source, value) whose value is set."""
    for source, value in candidates:
        if value is not None:
            return source, value
    return None


def _tpu_hosts_per_slice(tpu_type: str) -> int:
    from distill.topology import UnknownTpuTypeError, lookup

    try:
        return lookup(tpu_type).hosts
    except UnknownTpuTypeError as error:
        raise ConfigError(f"environment variable DISTILL_TPU_TYPE: {error}") from None


def _check_coordinator_address(address: str, source: str) -> None:
    host, separator, port = address.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"{source}={address!r} is not host:port; set it to the address of process 0, "
            "for example my-run-workers-0-0.my-run:8476"
        )


def detect_layout(config: RuntimeConfig, environ: Mapping[str, str]) -> ProcessLayout:
    """Return this process's layout from the environment and the config's runtime section.

    Environment variables override the config. Worker index: DISTILL_WORKER_INDEX, then
    TPU_WORKER_ID (GKE), then JOB_COMPLETION_INDEX (indexed Job). Slice index and count:
    DISTILL_SLICE_INDEX / DISTILL_NUM_SLICES, then MEGASCALE_SLICE_ID / MEGASCALE_NUM_SLICES.
    Hosts per slice: DISTILL_HOSTS_PER_SLICE, then the length of TPU_WORKER_HOSTNAMES, then the
    TPU topology table for DISTILL_TPU_TYPE. Without any of these, `runtime.process_id` and
    `runtime.num_processes` describe a single-slice CPU run, and their absence means one process.
    Pure: reads only its arguments, logs one line, and raises ConfigError naming the bad variable.
    """
    accelerator = _read_str(environ, "DISTILL_ACCELERATOR")
    if accelerator is None:
        accelerator = "tpu" if ("TPU_WORKER_HOSTNAMES" in environ or "TPU_WORKER_ID" in environ) else "cpu"
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"environment variable DISTILL_ACCELERATOR={accelerator!r} is invalid; set it to tpu or cpu")

    tpu_type = _read_str(environ, "DISTILL_TPU_TYPE") if accelerator == "tpu" else None

    worker = _first(
        ("DISTILL_WORKER_INDEX", _read_int(environ, "DISTILL_WORKER_INDEX", minimum=0)),
        ("TPU_WORKER_ID", _read_int(environ, "TPU_WORKER_ID", minimum=0)),
        ("JOB_COMPLETION_INDEX", _read_int(environ, "JOB_COMPLETION_INDEX", minimum=0)),
    )
    slice_index = _first(
        ("DISTILL_SLICE_INDEX", _read_int(environ, "DISTILL_SLICE_INDEX", minimum=0)),
        ("MEGASCALE_SLICE_ID", _read_int(environ, "MEGASCALE_SLICE_ID", minimum=0)),
    )
    num_slices = _first(
        ("DISTILL_NUM_SLICES", _read_int(environ, "DISTILL_NUM_SLICES", minimum=1)),
        ("MEGASCALE_NUM_SLICES", _read_int(environ, "MEGASCALE_NUM_SLICES", minimum=1)),
    )
    worker_hostnames = _read_str(environ, "TPU_WORKER_HOSTNAMES")
    hosts = _first(
        ("DISTILL_HOSTS_PER_SLICE", _read_int(environ, "DISTILL_HOSTS_PER_SLICE", minimum=1)),
        ("TPU_WORKER_HOSTNAMES", len(worker_hostnames.split(",")) if worker_hostnames else None),
        ("DISTILL_TPU_TYPE", _tpu_hosts_per_slice(tpu_type) if tpu_type else None),
    )
    if tpu_type is not None and hosts is not None and hosts[0] != "DISTILL_TPU_TYPE":
        expected = _tpu_hosts_per_slice(tpu_type)
        if hosts[1] != expected:
            raise ConfigError(
                f"{hosts[0]} gives {hosts[1]} hosts per slice but a {tpu_type} slice has {expected} hosts; "
                "render the chart again so that both come from the same TPU type"
            )

    coordinator = _read_str(environ, "DISTILL_COORDINATOR_ADDRESS")
    coordinator_source = "DISTILL_COORDINATOR_ADDRESS"
    if coordinator is None and config.coordinator_address:
        coordinator = config.coordinator_address
        coordinator_source = "runtime.coordinator_address"

    from_environment = any(item is not None for item in (worker, slice_index, num_slices, hosts))
    if from_environment:
        worker_index = worker[1] if worker else 0
        slice_value = slice_index[1] if slice_index else 0
        slice_count = num_slices[1] if num_slices else 1
        hosts_per_slice = hosts[1] if hosts else 1
        if worker_index >= hosts_per_slice:
            source = hosts[0] if hosts else "DISTILL_HOSTS_PER_SLICE (unset, so 1)"
            raise ConfigError(
                f"worker index {worker_index} (from {worker[0] if worker else 'default'}) is not below the "
                f"{hosts_per_slice} hosts per slice (from {source}); set DISTILL_HOSTS_PER_SLICE to the pods per slice"
            )
        if slice_value >= slice_count:
            source = num_slices[0] if num_slices else "DISTILL_NUM_SLICES (unset, so 1)"
            raise ConfigError(
                f"slice index {slice_value} (from {slice_index[0] if slice_index else 'default'}) is not below the "
                f"{slice_count} slices (from {source}); set DISTILL_NUM_SLICES to the number of slices"
            )
        num_processes = slice_count * hosts_per_slice
        process_id = slice_value * hosts_per_slice + worker_index
    else:
        # A plain local run: the config alone describes the processes of one CPU "slice".
        num_processes = config.num_processes or 1
        process_id = config.process_id or 0
        if process_id >= num_processes:
            raise ConfigError(
                f"runtime.process_id={process_id} must be below runtime.num_processes={num_processes}"
            )
        worker_index, hosts_per_slice, slice_value, slice_count = process_id, num_processes, 0, 1

    if coordinator is not None:
        _check_coordinator_address(coordinator, coordinator_source)
    if num_processes > 1 and coordinator is None and accelerator == "cpu":
        raise ConfigError(
            f"this CPU run has {num_processes} processes but no coordinator address; set "
            "DISTILL_COORDINATOR_ADDRESS or runtime.coordinator_address to host:port of process 0"
        )

    layout = ProcessLayout(
        process_id=process_id,
        num_processes=num_processes,
        worker_index=worker_index,
        hosts_per_slice=hosts_per_slice,
        slice_index=slice_value,
        num_slices=slice_count,
        coordinator_address=coordinator,
        accelerator=accelerator,
        tpu_type=tpu_type,
    )
    logger.info("process layout: %s", layout.describe())
    return layout


def wait_for_host(host: str, deadline: float, *, context: str) -> None:
    """Resolve `host` until it resolves or `deadline` (time.monotonic) passes.

    A headless Service publishes a pod's DNS record only once the pod exists, so a worker
    that starts before pod 0 sees "name not known" for a while. Raises RetriableError on timeout.
    """
    started = time.monotonic()
    last_log = started
    attempts = 0
    while True:
        attempts += 1
        try:
            socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError as error:
            now = time.monotonic()
            if now >= deadline:
                raise RetriableError(
                    f"{context}: the name {host} did not resolve within {now - started:.0f} s "
                    f"({attempts} lookups, last error: {error})"
                ) from None
            if attempts == 1:
                logger.info("%s: %s does not resolve yet (%s); retrying every %.0f s", context, host, error, DNS_RETRY_SECONDS)
            elif now - last_log >= DNS_LOG_INTERVAL_SECONDS:
                logger.info("%s: still waiting for %s to resolve (%.0f s so far)", context, host, now - started)
                last_log = now
            time.sleep(min(DNS_RETRY_SECONDS, max(0.0, deadline - now)))
            continue
        if attempts > 1:
            logger.info("%s: %s resolves after %.1f s", context, host, time.monotonic() - started)
        return


def coordinator_bind_address(coordinator: str, environ: Mapping[str, str]) -> str | None:
    """Return where process 0 listens: None means all interfaces (JAX's default).

    JAX_COORDINATOR_BIND_ADDRESS wins when set. A coordinator on a loopback address can only be
    reached from this machine, so process 0 listens on that address alone. Otherwise it listens
    on all interfaces, because pods on other nodes must reach it.
    """
    explicit = environ.get("JAX_COORDINATOR_BIND_ADDRESS", "").strip()
    if explicit:
        return explicit
    host, _, port = coordinator.rpartition(":")
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return f"{host}:{port}" if host != "localhost" else f"127.0.0.1:{port}"
    return None


def initialize_runtime(layout: ProcessLayout, timeout_seconds: int, *, environ: Mapping[str, str] | None = None) -> None:
    """Join the JAX distributed runtime described by `layout`; call before any other JAX use.

    One process: nothing to do. Otherwise wait for the coordinator's name to resolve, meet
    all workers at the rendezvous on the coordinator port (see distill.rendezvous), then call
    `jax.distributed.initialize`: on CPU with gloo collectives and every argument explicit, on
    TPU with JAX's GKE detection filling in a coordinator the chart left empty. Process 0
    listens on the address that `coordinator_bind_address` returns. Raises RetriableError
    (exit 75) when the coordinator or a worker does not join within `timeout_seconds`.

    NOTE: only the CPU branch has run (local multi-process tests). The TPU branch relies on
    jax 0.9.2's GKE detection, which uses coordinator port 8482 unless JAX_COORDINATOR_PORT is set.
    """
    if layout.num_processes == 1:
        logger.info("single process: the JAX distributed runtime is not started")
        return

    import jax

    from distill.rendezvous import join_rendezvous, serve_rendezvous

    environ = os.environ if environ is None else environ
    started = time.monotonic()
    deadline = started + timeout_seconds
    coordinator = layout.coordinator_address
    context = (
        f"process {layout.process_id} of {layout.num_processes} joining coordinator "
        f"{coordinator or '(auto-detected)'}"
    )

    if layout.accelerator == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    bind_address = None
    if coordinator is not None:
        host = coordinator.rpartition(":")[0].strip("[]")
        wait_for_host(host, deadline, context=context)
        bind_address = coordinator_bind_address(coordinator, environ)
        if layout.process_id == 0:
            serve_rendezvous(coordinator, layout.num_processes, deadline, bind_address=bind_address)
        else:
            join_rendezvous(coordinator, layout.process_id, layout.num_processes, deadline)
    else:
        # NOTE: without a coordinator address there is no rendezvous, so a missing worker makes
        # JAX abort the process (exit 134) after the timeout instead of exiting with 75.
        logger.info("%s: no coordinator address, so JAX detects it from the TPU environment", context)

    # Every worker is known to be up once the rendezvous passed, so JAX's own registration
    # normally takes well under a second; the floor keeps a rendezvous that used up most of
    # the timeout from starving it.
    jax_timeout = max(JAX_MIN_INITIALIZATION_SECONDS, int(deadline - time.monotonic()))
    logger.info("%s: starting the JAX distributed runtime (timeout %d s)", context, jax_timeout)
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=layout.num_processes,
        process_id=layout.process_id,
        # On CPU every argument is explicit; without "deactivate" JAX would still probe for
        # Kubernetes, Slurm and MPI environments to fill in local_device_ids.
        cluster_detection_method="deactivate" if layout.accelerator == "cpu" else None,
        initialization_timeout=jax_timeout,
        coordinator_bind_address=bind_address,
    )
    logger.info(
        "joined the JAX runtime as process %d of %d in %.1f s",
        layout.process_id, layout.num_processes, time.monotonic() - started,
    )
