"""Local JobSet runner: run the pods of a rendered JobSet as processes on this machine.

`distill local-jobset RENDERED.yaml` reads `helm template` output, expands the JobSet into its
pods the way the JobSet and Job controllers do (distill.jobset), and starts each pod's container
command as a local process with the environment Kubernetes would give it:

- fieldRef variables (job-completion-index, job-index, pod name), JOB_COMPLETION_INDEX, HOSTNAME;
- pod hostnames <jobset>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain> mapped to 127.0.0.1,
  and every port a pod would open on its own IP mapped to a distinct free local port;
- ConfigMap and emptyDir volumes as per-pod folders, with mount paths in the command and the
  environment rewritten to them;
- the distill config passed to `distill train` rewritten per pod: metrics on its own local port
  and on 127.0.0.1, a gs:// save_directory moved to a local folder, and any `--set` overrides.

Pod output is printed line by line with a `[hostname]` prefix, as `kubectl logs --prefix` does.
When a pod fails, the runner applies the Job's podFailurePolicy and backoffLimit and then the
JobSet's failurePolicy, stops the other pods and restarts all of them or fails, printing what the
JobSet controller would do. Only CPU pods run: a pod that requests google.com/tpu is rejected.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill.jobset import (
    REASON_BACKOFF_LIMIT,
    REASON_POD_FAILURE_POLICY,
    RESTART_ACTIONS,
    Job,
    JobFailure,
    JobSet,
    ManifestError,
    Pod,
    jobset_failure_decision,
    jobset_succeeded,
    load_documents,
    parse_jobset,
    pod_failure_action,
)

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"

# Seconds between two checks of the pod processes.
POLL_SECONDS = 0.2

# Exit code of the runner when --timeout stops the run (the convention of timeout(1)).
TIMEOUT_EXIT_CODE = 124

FIELD_PATH = re.compile(r"^metadata\.(annotations|labels)\['([^']+)'\]$")


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the runner's options to the `distill local-jobset` subcommand."""
    parser.add_argument("rendered", help="file with `helm template` output (one JobSet and its ConfigMap), or - for stdin")
    parser.add_argument(
        "--workdir", default=".",
        help="working directory of every pod process; relative paths in the config resolve here (default: .)",
    )
    parser.add_argument(
        "--state-dir",
        help="folder for per-pod volumes, rewritten configs, logs and gs:// checkpoints (default: a new temporary folder, kept)",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a key of the distill config, as a dotted path and a YAML value "
        "(for example --set teacher.path=/data/teacher); repeatable",
    )
    parser.add_argument(
        "--env", dest="extra_env", action="append", default=[], metavar="NAME=VALUE",
        help="set an environment variable in every pod, after the pod's own (for Secret values); repeatable",
    )
    parser.add_argument(
        "--delay", action="append", default=[], metavar="POD=SECONDS",
        help="start a pod late, by hostname or <jobIndex>-<podIndex> (for example 0-0=20); repeatable",
    )
    parser.add_argument(
        "--grace-seconds", type=float,
        help="seconds between SIGTERM and SIGKILL when stopping pods (default: the pod's terminationGracePeriodSeconds)",
    )
    parser.add_argument(
        "--timeout", type=float, default=0.0,
        help=f"stop every pod and exit {TIMEOUT_EXIT_CODE} after this many seconds (default: 0 = no limit)",
    )
    parser.add_argument("--namespace", default="default", help="namespace the pods pretend to run in (default: default)")


def _parse_pairs(values: list[str], option: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        key, separator, rest = value.partition("=")
        if not separator or not key:
            raise ManifestError(f"{option} {value!r} is not KEY=VALUE; write it as {option} name=value")
        pairs.append((key, rest))
    return pairs


def main(args: argparse.Namespace) -> int:
    """Run the rendered JobSet until it completes or fails, and return the runner's exit code.

    The code is 0 when the JobSet completes, 124 when --timeout stopped it and 143 when SIGTERM
    did. Otherwise it is the exit code of the pod whose failure ended the run, or 1 when that
    code is unknown.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s local-jobset %(levelname)s: %(message)s")
    try:
        runner = LocalJobSetRunner.from_args(args)
    except ManifestError as error:
        logger.error("%s", error)
        return 2
    return runner.run()


# ----------------------------------------------------------------------------------------------
# Hostnames and ports


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOCALHOST, 0))
        return probe.getsockname()[1]


class AddressMap:
    """Map pod DNS names to 127.0.0.1 and each (pod, port) to its own free local port.

    On a cluster every pod has its own IP, so all of them open the same ports. On one machine
    they would clash, so each (pod, port) pair gets a port of its own, stable across restarts.
    """

    def __init__(self, jobset: JobSet) -> None:
        self._ports: dict[tuple[str, int], int] = {}
        self._names: dict[str, str] = {}
        suffixes = ["", f".{jobset.subdomain}", f".{jobset.subdomain}.{jobset.namespace}",
                    f".{jobset.subdomain}.{jobset.namespace}.svc",
                    f".{jobset.subdomain}.{jobset.namespace}.svc.cluster.local"]
        for hostname in jobset.hostnames():
            for suffix in suffixes:
                self._names[hostname + suffix] = hostname
        # Longest names first, so a FQDN is replaced before its hostname prefix.
        alternatives = "|".join(re.escape(name) for name in sorted(self._names, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<![-\w.])({alternatives})(?::(\d+))?(?![-\w])")

    def port(self, hostname: str, port: int) -> int:
        """Return the local port standing in for `port` on pod `hostname`."""
        key = (hostname, port)
        if key not in self._ports:
            self._ports[key] = _free_port()
            logger.info("port %s:%d -> %s:%d", hostname, port, LOCALHOST, self._ports[key])
        return self._ports[key]

    def rewrite(self, text: str) -> str:
        """Replace pod names (with an optional :port) in `text` by 127.0.0.1 and the mapped port."""

        def replace(match: re.Match[str]) -> str:
            hostname = self._names[match.group(1)]
            if match.group(2) is None:
                return LOCALHOST
            return f"{LOCALHOST}:{self.port(hostname, int(match.group(2)))}"

        return self._pattern.sub(replace, text)


# ----------------------------------------------------------------------------------------------
# Pod environment, volumes and command


@dataclass
class PreparedPod:
    """A pod ready to start: its argv, environment and working directory."""

    pod: Pod
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path


def _expand_references(value: str, env: dict[str, str]) -> str:
    """Expand $(NAME) references to earlier variables, as the kubelet does; $$ escapes a dollar."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, value)


class PodBuilder:
    """Turn a Pod of the JobSet into a PreparedPod for one restart attempt."""

    def __init__(self, jobset: JobSet, addresses: AddressMap, state_dir: Path, workdir: Path,
                 overrides: list[tuple[str, str]], extra_env: list[tuple[str, str]]) -> None:
        self.jobset = jobset
        self.addresses = addresses
        self.state_dir = state_dir
        self.workdir = workdir
        self.overrides = overrides
        self.extra_env = extra_env
        self._reported: set[str] = set()

    def _report_once(self, message: str, *args: Any) -> None:
        """Log a rewrite once per run rather than once per pod and attempt."""
        text = message % args
        if text not in self._reported:
            self._reported.add(text)
            logger.info("%s", text)

    def _field_value(self, pod: Pod, field_path: str, restart_attempt: int) -> str:
        match = FIELD_PATH.match(field_path)
        if match:
            metadata = pod.metadata(restart_attempt)
            if match.group(2) in metadata:
                return metadata[match.group(2)]
            raise ManifestError(
                f"pod {pod.hostname}: fieldRef {field_path} names a key the controllers do not set; "
                f"known keys: {', '.join(sorted(metadata))}"
            )
        simple = {
            "metadata.name": pod.hostname,
            "metadata.namespace": self.jobset.namespace,
            "status.podIP": LOCALHOST,
            "status.hostIP": LOCALHOST,
            "spec.nodeName": "localhost",
            "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
        }
        if field_path in simple:
            return simple[field_path]
        raise ManifestError(f"pod {pod.hostname}: fieldRef {field_path} is not supported by the local runner")

    def _env_value(self, pod: Pod, entry: dict[str, Any], env: dict[str, str], restart_attempt: int) -> str | None:
        name = entry["name"]
        if "value" in entry:
            return _expand_references(str(entry["value"]), env)
        source = entry.get("valueFrom") or {}
        if "fieldRef" in source:
            return self._field_value(pod, source["fieldRef"]["fieldPath"], restart_attempt)
        if "configMapKeyRef" in source:
            reference = source["configMapKeyRef"]
            data = self.jobset.config_maps.get(reference.get("name"), {})
            if reference.get("key") in data:
                return data[reference["key"]]
            if reference.get("optional"):
                return None
            raise ManifestError(f"pod {pod.hostname}: env {name} needs ConfigMap {reference.get('name')} key {reference.get('key')}, which is not rendered")
        if "secretKeyRef" in source:
            if any(key == name for key, _ in self.extra_env) or source["secretKeyRef"].get("optional"):
                return None
            reference = source["secretKeyRef"]
            raise ManifestError(
                f"pod {pod.hostname}: env {name} comes from Secret {reference.get('name')} key "
                f"{reference.get('key')}; pass its value with --env {name}=VALUE"
            )
        if "resourceFieldRef" in source:
            return "0"
        return ""

    def _mount_volumes(self, pod: Pod, pod_dir: Path) -> dict[str, Path]:
        """Create the pod's volumes as folders; return mount path -> local folder."""
        volumes = {volume["name"]: volume for volume in pod.spec.get("volumes") or []}
        mounts: dict[str, Path] = {}
        for mount in pod.container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"])
            if volume is None:
                raise ManifestError(f"pod {pod.hostname}: volumeMount {mount['name']} has no matching volume")
            local = pod_dir / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                self._write_config_map(pod, volume["configMap"], local)
            elif "emptyDir" not in volume:
                kind = next((key for key in volume if key != "name"), "unknown")
                raise ManifestError(
                    f"pod {pod.hostname}: volume {mount['name']} of type {kind} is not supported by the "
                    "local runner (only configMap and emptyDir)"
                )
            sub_path = mount.get("subPath")
            mounts[mount["mountPath"].rstrip("/") or "/"] = local / sub_path if sub_path else local
        return mounts

    def _write_config_map(self, pod: Pod, source: dict[str, Any], folder: Path) -> None:
        name = source.get("name")
        data = self.jobset.config_maps.get(name)
        if data is None:
            if source.get("optional"):
                return
            raise ManifestError(f"pod {pod.hostname} mounts ConfigMap {name}, which the rendered manifests do not contain")
        items = source.get("items") or [{"key": key, "path": key} for key in data]
        for item in items:
            target = folder / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[item["key"]], encoding="utf-8")

    @staticmethod
    def _map_path(value: str, mounts: dict[str, Path]) -> str:
        """Replace a leading mount path in `value` by the local folder of that mount.

        A path below a mount that already exists on this machine is kept: it names a host file
        (this checkout under /tmp, say, where the chart mounts an emptyDir), not one the pod
        would find in its volume.
        """
        for mount_path in sorted(mounts, key=len, reverse=True):
            if value == mount_path:
                return str(mounts[mount_path])
            if value.startswith(mount_path + "/"):
                if Path(value).exists():
                    return value
                return str(mounts[mount_path]) + value[len(mount_path):]
        return value

    def _rewrite_distill_config(self, pod: Pod, path: Path) -> None:
        """Rewrite the config that `distill train` reads so that the pod runs on this machine."""
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(config, dict):
            raise ManifestError(f"pod {pod.hostname}: {path.name} is invalid: a distill config must be a YAML mapping")

        for key, raw_value in self.overrides:
            _set_dotted(config, key, yaml.safe_load(raw_value) if raw_value != "" else None)
            self._report_once("config: %s set to %r by --set", key, raw_value)

        metrics = config.get("metrics") or {}
        config["metrics"] = metrics
        port = int(metrics.get("port", 9400))
        if port != 0:
            metrics["port"] = self.addresses.port(pod.hostname, port)
        if metrics.get("host", "0.0.0.0") != LOCALHOST:
            self._report_once("config: metrics.host %s -> %s (local pods listen on loopback only)", metrics.get("host", "0.0.0.0"), LOCALHOST)
            metrics["host"] = LOCALHOST

        training = config.get("training") if isinstance(config.get("training"), dict) else {}
        save_directory = str(training.get("save_directory", ""))
        if save_directory.startswith("gs://"):
            local = self.state_dir / "gcs" / save_directory[len("gs://"):]
            local.mkdir(parents=True, exist_ok=True)
            training["save_directory"] = str(local)
            self._report_once("config: training.save_directory %s -> %s (no GCS access in local runs)", save_directory, local)

        runtime = config.get("runtime") or {}
        if runtime.get("coordinator_address"):
            runtime["coordinator_address"] = self.addresses.rewrite(str(runtime["coordinator_address"]))

        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    def _resolve_command(self, pod: Pod, argv: list[str], mounts: dict[str, Path]) -> list[str]:
        if not argv:
            raise ManifestError(f"pod {pod.hostname}: the container sets no command; the local runner cannot run an image's entrypoint")
        argv = [self._map_path(self.addresses.rewrite(arg), mounts) for arg in argv]
        if argv[0] == "distill":
            local = Path(sys.executable).with_name("distill")
            argv[0] = str(local) if local.exists() else (shutil.which("distill") or "distill")
        elif shutil.which(argv[0]) is None:
            raise ManifestError(f"pod {pod.hostname}: command {argv[0]!r} is not on this machine's PATH")

        # `... train CONFIG` with CONFIG inside a mounted volume: the pod's own copy of the config.
        volume_folders = [str(folder) for folder in mounts.values()]
        for index in range(1, len(argv) - 1):
            config_path = argv[index + 1]
            if argv[index] == "train" and any(config_path.startswith(folder + "/") for folder in volume_folders):
                self._rewrite_distill_config(pod, Path(config_path))
        return argv

    def prepare(self, pod: Pod, restart_attempt: int) -> PreparedPod:
        """Build the pod's folders, environment and argv for `restart_attempt` (fresh emptyDirs each time)."""
        container = pod.container
        resources = container.get("resources") or {}
        for section in ("requests", "limits"):
            if "google.com/tpu" in (resources.get(section) or {}):
                raise ManifestError(
                    f"pod {pod.hostname} requests google.com/tpu; the local runner starts CPU processes only, "
                    "so render the chart with accelerator: cpu (see helm/distill/ci/cpu-smoke.yaml)"
                )

        # A pod recreated within the same attempt gets new folders, as a new pod gets new emptyDirs.
        pod_dir = self.state_dir / f"attempt-{restart_attempt}" / pod.hostname
        recreated = 0
        while pod_dir.exists():
            recreated += 1
            pod_dir = self.state_dir / f"attempt-{restart_attempt}" / f"{pod.hostname}-recreated-{recreated}"
        pod_dir.mkdir(parents=True)
        mounts = self._mount_volumes(pod, pod_dir)

        env: dict[str, str] = {
            "JOB_COMPLETION_INDEX": str(pod.pod_index),
            "HOSTNAME": pod.hostname,
        }
        for entry in container.get("env") or []:
            value = self._env_value(pod, entry, env, restart_attempt)
            if value is not None:
                env[entry["name"]] = self._map_path(self.addresses.rewrite(value), mounts)
        for name, value in self.extra_env:
            env[name] = value

        # JAX's coordinator (and the distill rendezvous before it) listen on all interfaces by
        # default; locally they must stay on loopback.
        coordinator = env.get("DISTILL_COORDINATOR_ADDRESS", "")
        if coordinator.startswith(f"{LOCALHOST}:"):
            env["JAX_COORDINATOR_BIND_ADDRESS"] = coordinator

        argv = self._resolve_command(pod, list(container.get("command") or []) + list(container.get("args") or []), mounts)
        return PreparedPod(pod=pod, argv=argv, env=env, cwd=self.workdir, log_path=pod_dir / "log.txt")


def _set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ManifestError(f"--set {dotted}: {key} is not a mapping in the config")
        node = child
    node[keys[-1]] = value


# ----------------------------------------------------------------------------------------------
# Processes


@dataclass
class RunningPod:
    """A started pod process and the thread that copies its output."""

    prepared: PreparedPod
    process: subprocess.Popen
    pump: threading.Thread
    started: float
    exit_code: int | None = None

    @property
    def hostname(self) -> str:
        return self.prepared.pod.hostname


def _kubernetes_exit_code(returncode: int) -> int:
    """Return the exit code Kubernetes reports: 128 + signal for a process killed by a signal."""
    return 128 - returncode if returncode < 0 else returncode


_print_lock = threading.Lock()


def _pump_output(stream: Any, prefix: str, log_path: Path) -> None:
    with open(log_path, "ab") as log_file:
        for raw in iter(stream.readline, b""):
            log_file.write(raw)
            log_file.flush()
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            with _print_lock:
                sys.stdout.write(f"[{prefix}] {line}\n")
                sys.stdout.flush()
    stream.close()


def _start(prepared: PreparedPod) -> RunningPod:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(prepared.env)
    process = subprocess.Popen(
        prepared.argv,
        cwd=prepared.cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # Its own process group, so that stopping the pod also stops anything it started.
        start_new_session=True,
    )
    pump = threading.Thread(
        target=_pump_output, args=(process.stdout, prepared.pod.hostname, prepared.log_path), daemon=True
    )
    pump.start()
    logger.info("pod %s started (pid %d): %s", prepared.pod.hostname, process.pid, " ".join(prepared.argv))
    return RunningPod(prepared=prepared, process=process, pump=pump, started=time.monotonic())


def _signal_group(running: RunningPod, signum: int) -> None:
    try:
        os.killpg(running.process.pid, signum)
    except ProcessLookupError:
        pass


def _stop(pods: list[RunningPod], grace_seconds: float | None, reason: str) -> None:
    """Send SIGTERM to every running pod, then SIGKILL to those still running after the grace period."""
    alive = [pod for pod in pods if pod.process.poll() is None]
    if alive:
        grace = grace_seconds if grace_seconds is not None else max(p.prepared.pod.termination_grace_seconds for p in alive)
        logger.info("stopping %d pod(s) (%s): SIGTERM, then SIGKILL after %.0f s", len(alive), reason, grace)
        for pod in alive:
            _signal_group(pod, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for pod in alive:
            try:
                pod.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("pod %s still running after %.0f s; sending SIGKILL", pod.hostname, grace)
                _signal_group(pod, signal.SIGKILL)
                pod.process.wait()
            logger.info("pod %s stopped (exit code %d)", pod.hostname, _kubernetes_exit_code(pod.process.returncode))
    for pod in pods:
        # Anything the pod started in its group goes too, as when Kubernetes deletes the pod.
        _signal_group(pod, signal.SIGKILL)
        pod.pump.join(timeout=5)


# ----------------------------------------------------------------------------------------------
# Supervision


class RunnerTerminated(Exception):
    """The runner received SIGTERM."""


_termination_signals: list[str] = []


def _record_termination(signum: int, _frame: Any) -> None:
    # Only record it: an exception raised here could land inside a logging call, which
    # swallows it. The polling loop checks the record and stops the pods.
    _termination_signals.append(signal.Signals(signum).name)


@dataclass
class AttemptResult:
    """Outcome of one start of all pods."""

    succeeded: bool
    failure: JobFailure | None = None
    timed_out: bool = False


@dataclass
class LocalJobSetRunner:
    """Run a JobSet's pods, restarting or failing them as the JobSet controller would."""

    jobset: JobSet
    builder: PodBuilder
    delays: dict[str, float]
    grace_seconds: float | None
    timeout: float
    state_dir: Path
    restarts: int = 0
    _deadline: float = field(default=0.0)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LocalJobSetRunner:
        text = sys.stdin.read() if args.rendered == "-" else Path(args.rendered).read_text(encoding="utf-8")
        jobset = parse_jobset(load_documents(text), namespace=args.namespace)
        state_dir = Path(args.state_dir) if args.state_dir else Path(tempfile.mkdtemp(prefix="distill-local-jobset-"))
        state_dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(args.workdir).resolve()
        if not workdir.is_dir():
            raise ManifestError(f"--workdir {args.workdir} is not a folder")

        addresses = AddressMap(jobset)
        builder = PodBuilder(
            jobset, addresses, state_dir.resolve(), workdir,
            overrides=_parse_pairs(args.overrides, "--set"),
            extra_env=_parse_pairs(args.extra_env, "--env"),
        )
        delays = {}
        hostnames = jobset.hostnames()
        for key, seconds in _parse_pairs(args.delay, "--delay"):
            matches = [h for h in hostnames if h == key or h.endswith(f"-{key}")]
            if len(matches) != 1:
                raise ManifestError(f"--delay {key}: matches {len(matches)} pods; use one of {', '.join(hostnames)}")
            delays[matches[0]] = float(seconds)
        return cls(jobset=jobset, builder=builder, delays=delays, grace_seconds=args.grace_seconds,
                   timeout=args.timeout, state_dir=state_dir)

    def run(self) -> int:
        """Start all pods, apply the failure policies until the JobSet completes or fails."""
        started = time.monotonic()
        # SIGTERM stops the pods too, instead of leaving them running without a supervisor.
        signal.signal(signal.SIGTERM, _record_termination)
        self._deadline = started + self.timeout if self.timeout > 0 else float("inf")
        logger.info(
            "JobSet %s: %d pod(s) in %d job(s), maxRestarts %d; state in %s",
            self.jobset.name, len(self.jobset.pods), len(self.jobset.jobs), self.jobset.max_restarts, self.state_dir,
        )
        while True:
            try:
                result = self._run_attempt()
            except ManifestError as error:
                logger.error("%s", error)
                return 2
            except RunnerTerminated as error:
                logger.error("JobSet %s stopped: the runner received %s", self.jobset.name, error)
                return 128 + signal.SIGTERM
            elapsed = time.monotonic() - started
            if result.succeeded:
                logger.info("JobSet %s completed after %d restart(s) in %.1f s", self.jobset.name, self.restarts, elapsed)
                return 0
            if result.timed_out:
                logger.error("JobSet %s stopped: --timeout of %.0f s reached", self.jobset.name, self.timeout)
                return TIMEOUT_EXIT_CODE

            failure = result.failure
            assert failure is not None
            decision = jobset_failure_decision(self.jobset, failure)
            rule = f"rule {decision.rule_name}" if decision.rule_name else "no matching rule"
            logger.info(
                "Job %s failed (reason %s: %s); JobSet failurePolicy: %s -> %s",
                failure.job.name, failure.reason, failure.message, rule, decision.action,
            )
            if decision.action == "FailJobSet":
                logger.error("JobSet %s failed in %.1f s: the JobSet controller would not restart it", self.jobset.name, elapsed)
                return failure.exit_code or 1
            if decision.action not in RESTART_ACTIONS:
                raise ManifestError(f"failurePolicy action {decision.action!r} is not a JobSet action")
            if decision.counts_restart and self.restarts >= self.jobset.max_restarts:
                logger.error(
                    "JobSet %s failed in %.1f s: %d restart(s) used of maxRestarts %d",
                    self.jobset.name, elapsed, self.restarts, self.jobset.max_restarts,
                )
                return failure.exit_code or 1
            if decision.action.startswith("RestartJob") and not decision.action.startswith("RestartJobSet"):
                # NOTE: the controller would recreate only the failed Job; a JAX runtime spans every
                # Job, so restarting them all is what the workers need anyway.
                logger.info("RestartJob: the local runner restarts every Job of the JobSet")
            if decision.counts_restart:
                self.restarts += 1
            logger.info("JobSet %s: restart %d of maxRestarts %d (restart-attempt %d)",
                        self.jobset.name, self.restarts, self.jobset.max_restarts, self.restarts)

    def _run_attempt(self) -> AttemptResult:
        attempt = self.restarts
        pending = {pod.hostname: pod for pod in self.jobset.pods}
        start_at = {hostname: time.monotonic() + self.delays.get(hostname, 0.0) for hostname in pending}
        for hostname, delay in self.delays.items():
            logger.info("pod %s starts %.0f s late (--delay)", hostname, delay)

        running: dict[str, RunningPod] = {}
        finished: list[RunningPod] = []
        succeeded: set[str] = set()
        failures: dict[str, int] = {job.name: 0 for job in self.jobset.jobs}
        jobs_by_name = {job.name: job for job in self.jobset.jobs}
        all_pods: list[RunningPod] = []
        try:
            while True:
                if _termination_signals:
                    raise RunnerTerminated(_termination_signals[0])
                now = time.monotonic()
                if now >= self._deadline:
                    _stop(all_pods, self.grace_seconds, "timeout")
                    return AttemptResult(succeeded=False, timed_out=True)

                for hostname in [h for h, at in start_at.items() if at <= now and h in pending]:
                    prepared = self.builder.prepare(pending.pop(hostname), attempt)
                    running[hostname] = _start(prepared)
                    all_pods.append(running[hostname])

                for hostname, pod in list(running.items()):
                    returncode = pod.process.poll()
                    if returncode is None:
                        continue
                    del running[hostname]
                    finished.append(pod)
                    pod.pump.join(timeout=5)
                    exit_code = _kubernetes_exit_code(returncode)
                    pod.exit_code = exit_code
                    job = jobs_by_name[pod.prepared.pod.job_name]
                    logger.info("pod %s exited with code %d after %.1f s", hostname, exit_code, time.monotonic() - pod.started)

                    if exit_code == 0:
                        succeeded.add(hostname)
                        completed = {j.name for j in self.jobset.jobs if all(p.hostname in succeeded for p in j.pods)}
                        if jobset_succeeded(self.jobset, completed):
                            _stop(all_pods, self.grace_seconds, "JobSet completed")
                            return AttemptResult(succeeded=True)
                        continue

                    failure = self._pod_failed(job, pod, exit_code, failures)
                    if failure is not None:
                        _stop(all_pods, self.grace_seconds, f"Job {job.name} failed")
                        return AttemptResult(succeeded=False, failure=failure)
                    # The Job controller recreates only this pod.
                    pending[hostname] = pod.prepared.pod
                    start_at[hostname] = time.monotonic()

                time.sleep(POLL_SECONDS)
        except BaseException:
            _stop(all_pods, self.grace_seconds, "runner interrupted")
            raise

    def _pod_failed(self, job: Job, pod: RunningPod, exit_code: int, failures: dict[str, int]) -> JobFailure | None:
        """Apply the Job's podFailurePolicy and backoffLimit; return the Job failure, if any."""
        container_name = pod.prepared.pod.container.get("name", "")
        action, rule_index = pod_failure_action(job, container_name, exit_code)
        where = f"rule at index {rule_index}" if rule_index is not None else "no matching rule"
        logger.info("pod %s: Job podFailurePolicy %s -> %s", pod.hostname, where, action)
        if action == "FailJob":
            message = (
                f"Container {container_name} for pod {self.jobset.namespace}/{pod.hostname} failed with exit code "
                f"{exit_code} matching FailJob rule at index {rule_index}"
            )
            return JobFailure(job=job, reason=REASON_POD_FAILURE_POLICY, message=message, exit_code=exit_code)
        if action == "Ignore":
            logger.info("pod %s: failure ignored, the Job controller recreates the pod", pod.hostname)
            return None
        if action == "FailIndex":
            message = f"index {pod.prepared.pod.pod_index} failed (FailIndex) with exit code {exit_code}"
            return JobFailure(job=job, reason="FailedIndexes", message=message, exit_code=exit_code)

        failures[job.name] += 1
        if failures[job.name] > job.backoff_limit:
            message = f"Job has reached the specified backoff limit ({job.backoff_limit}); pod {pod.hostname} exited with code {exit_code}"
            return JobFailure(job=job, reason=REASON_BACKOFF_LIMIT, message=message, exit_code=exit_code)
        logger.info(
            "pod %s: failure %d of backoffLimit %d, the Job controller recreates the pod",
            pod.hostname, failures[job.name], job.backoff_limit,
        )
        return None
