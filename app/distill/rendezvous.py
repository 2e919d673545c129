"""Worker rendezvous before the JAX runtime starts, so a missing worker fails cleanly.

jax 0.9.2 aborts the whole process (SIGABRT, exit 134, a C++ stack trace) when a worker does
not register with the coordination service in time, so Python cannot turn that into the
documented retriable exit code. Before `jax.distributed.initialize`, process 0 therefore
listens on the coordinator port itself and waits until every other process has sent its hello.
Then it sends "go" to all of them, closes the port and lets JAX bind it. A timeout here
raises RetriableError naming the coordinator and the missing process ids.

Protocol: one JSON line each way over TCP. Peer to coordinator:
{"process_id": i, "num_processes": n}. Coordinator to peer: {"status": "go"} or
{"status": "error", "message": ...}.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time

from distill.config import ConfigError
from distill.exitcodes import RetriableError

logger = logging.getLogger(__name__)

# Seconds between two connection attempts of a peer while the coordinator is not listening yet.
CONNECT_RETRY_SECONDS = 1.0

# Seconds between two "still waiting" log lines.
LOG_INTERVAL_SECONDS = 30.0

# Maximum length of a hello or reply line (bytes), because a real one is under 100 bytes.
MAX_LINE_BYTES = 4096


def split_address(address: str) -> tuple[str, int]:
    """Return (host, port) of a host:port string; brackets around an IPv6 host are removed."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _bind_address(coordinator_address: str, bind_address: str | None) -> tuple[str, int]:
    """Return where process 0 listens: JAX_COORDINATOR_BIND_ADDRESS when set, else all interfaces."""
    if bind_address:
        return split_address(bind_address)
    return "", split_address(coordinator_address)[1]


def _open_listener(host: str, port: int) -> socket.socket:
    if host == "" and socket.has_dualstack_ipv6():
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host or "0.0.0.0", port), family=family)


def _send_line(connection: socket.socket, payload: dict) -> None:
    connection.sendall((json.dumps(payload) + "\n").encode())


def _read_line(connection: socket.socket, deadline: float) -> dict | None:
    """Read one JSON line; return None when the peer closed the connection or time ran out."""
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        connection.settimeout(remaining)
        try:
            chunk = connection.recv(MAX_LINE_BYTES)
        except (TimeoutError, OSError):
            return None
        if not chunk:
            return None
        data += chunk
        if len(data) > MAX_LINE_BYTES:
            return None
    try:
        return json.loads(data.split(b"\n", 1)[0])
    except json.JSONDecodeError:
        return None


def serve_rendezvous(
    coordinator_address: str,
    num_processes: int,
    deadline: float,
    *,
    bind_address: str | None = None,
) -> None:
    """Run the coordinator side: wait for hellos from processes 1..n-1, then release them all.

    Raises RetriableError when some process has sent no hello by `deadline` (time.monotonic).
    """
    started = time.monotonic()
    host, port = _bind_address(coordinator_address, bind_address)
    try:
        listener = _open_listener(host, port)
    except OSError as error:
        raise RetriableError(
            f"process 0 cannot listen on {host or '*'}:{port} for the worker rendezvous: {error}; "
            "another process holds the coordinator port"
        ) from None

    waiting: dict[int, socket.socket] = {}
    expected = set(range(1, num_processes))
    last_log = started
    logger.info(
        "rendezvous: process 0 listening on %s:%d for process ids %s",
        host or "*", port, sorted(expected) if len(expected) <= 16 else f"1..{num_processes - 1}",
    )
    try:
        while set(waiting) != expected:
            now = time.monotonic()
            if now >= deadline:
                missing = sorted(expected - set(waiting))
                raise RetriableError(
                    f"rendezvous timed out after {now - started:.0f} s: coordinator {coordinator_address} "
                    f"(process 0) expected {num_processes} workers but process ids {missing} did not join; "
                    "check that their pods started and can reach the coordinator"
                )
            if now - last_log >= LOG_INTERVAL_SECONDS:
                missing = sorted(expected - set(waiting))
                logger.info("rendezvous: still waiting for process ids %s (%.0f s so far)", missing, now - started)
                last_log = now

            readable, _, _ = select.select([listener], [], [], min(1.0, max(0.0, deadline - now)))
            if not readable:
                continue
            connection, peer = listener.accept()
            hello = _read_line(connection, min(deadline, time.monotonic() + 10.0))
            process_id = _check_hello(hello, num_processes, connection, peer)
            if process_id is None:
                continue
            previous = waiting.pop(process_id, None)
            if previous is not None:
                logger.warning("rendezvous: process %d connected again from %s; replacing its earlier connection", process_id, peer)
                previous.close()
            waiting[process_id] = connection
            logger.info("rendezvous: process %d joined from %s (%d of %d)", process_id, peer[0], len(waiting) + 1, num_processes)

        for process_id, connection in sorted(waiting.items()):
            try:
                _send_line(connection, {"status": "go"})
            except OSError as error:
                raise RetriableError(
                    f"rendezvous: process {process_id} left before the start signal ({error}); restart all workers"
                ) from None
        logger.info("rendezvous: all %d workers joined in %.1f s", num_processes, time.monotonic() - started)
    finally:
        for connection in waiting.values():
            connection.close()
        listener.close()


def _check_hello(hello: dict | None, num_processes: int, connection: socket.socket, peer: tuple) -> int | None:
    """Return the process id of a valid hello; close the connection and return None otherwise."""
    if not isinstance(hello, dict) or not isinstance(hello.get("process_id"), int):
        logger.warning("rendezvous: ignoring a connection from %s that sent no valid hello", peer[0])
        connection.close()
        return None
    process_id = hello["process_id"]
    if hello.get("num_processes") != num_processes or not 1 <= process_id < num_processes:
        message = (
            f"process {process_id} expects {hello.get('num_processes')} workers but the coordinator expects "
            f"{num_processes}; every pod must be rendered from the same chart values"
        )
        logger.error("rendezvous: %s", message)
        try:
            _send_line(connection, {"status": "error", "message": message})
        except OSError:
            pass
        connection.close()
        raise ConfigError(message)
    return process_id


def join_rendezvous(coordinator_address: str, process_id: int, num_processes: int, deadline: float) -> None:
    """Run the peer side: connect to process 0 (retrying until `deadline`) and wait for "go".

    Raises RetriableError when the coordinator is not reachable or does not release this
    process by `deadline`, and ConfigError when the coordinator reports a layout mismatch.
    """
    started = time.monotonic()
    host, port = split_address(coordinator_address)
    attempts = 0
    last_error = ""
    last_log = started
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise RetriableError(
                f"rendezvous timed out after {now - started:.0f} s: process {process_id} could not join coordinator "
                f"{coordinator_address} (process 0) of {num_processes} workers ({attempts} attempts, last: "
                f"{last_error}); check that the pod of process 0 started"
            )
        attempts += 1
        try:
            connection = socket.create_connection((host, port), timeout=min(5.0, max(0.1, deadline - now)))
        except OSError as error:
            message = f"{type(error).__name__}: {error}"
            if attempts == 1 or message != last_error or time.monotonic() - last_log >= LOG_INTERVAL_SECONDS:
                logger.info("rendezvous: coordinator %s not reachable yet (%s); retrying", coordinator_address, message)
                last_log = time.monotonic()
            last_error = message
            time.sleep(min(CONNECT_RETRY_SECONDS, max(0.0, deadline - time.monotonic())))
            continue

        with connection:
            try:
                _send_line(connection, {"process_id": process_id, "num_processes": num_processes})
            except OSError as error:
                last_error = f"{type(error).__name__}: {error}"
                continue
            logger.info("rendezvous: process %d connected to %s; waiting for all workers", process_id, coordinator_address)
            reply = _read_line(connection, deadline)

        if reply is None:
            # The coordinator closed the connection (it restarted or timed out) or time ran out:
            # go around and reconnect while time is left.
            last_error = "connection closed before the start signal"
            continue
        if reply.get("status") == "go":
            logger.info("rendezvous: process %d released after %.1f s", process_id, time.monotonic() - started)
            return
        raise ConfigError(f"rendezvous rejected by coordinator {coordinator_address}: {reply.get('message')}")
