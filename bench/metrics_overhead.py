"""Measure what the metrics exporter costs a training step: none, exporter, exporter under scrapes.

Three variants run side by side in one process, interleaved round by round so that load
from other processes on the machine affects all of them alike:

* baseline: the step alone;
* exporter: TrainingMetrics serving /metrics on 127.0.0.1, `record_step` after every step;
* scraped:  as exporter, while a separate process fetches /metrics 10 times per second
  (the scraper is bounded in request count and duration).

The step is a jitted JAX update of a small MLP with AdamW on CPU (about 80 ms of CPU time
on the 2-core build machine), followed by the same host transfers the training loop does
(`float()` of each scalar). The exporter's cost per step is fixed and scrapes cost per
second, so the relative overhead shrinks as steps get longer.

Two numbers per variant: steps/s of wall time, which other processes on a shared machine
disturb, and CPU time of this process per step, which includes the exporter's HTTP thread
and is far less sensitive to them.

Usage: python bench/metrics_overhead.py [--steps 10] [--rounds 30] [--scrapes-per-second 10]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request

logger = logging.getLogger("bench.metrics_overhead")

# Runs in a separate process, as Prometheus does; stops after max_requests or max_seconds.
# SIGTERM ends it early; it prints the number of scrapes it completed either way.
SCRAPER = """
import signal, sys, time, urllib.request
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
url, rate, max_requests, max_seconds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
started = time.monotonic()
sent = 0
try:
    while sent < max_requests and time.monotonic() - started < max_seconds:
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()
        sent += 1
        next_time = started + sent / rate
        time.sleep(max(0.0, next_time - time.monotonic()))
finally:
    print(sent, flush=True)
"""


def build_step():
    """Return (step function, initial state): one AdamW update of a 3-layer MLP on a fixed batch."""
    import jax
    import jax.numpy as jnp
    import optax

    width = 1024
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {f"w{i}": jax.random.normal(keys[i], (width, width)) * 0.02 for i in range(3)}
    batch = jax.random.normal(keys[3], (512, width))
    tx = optax.adamw(1e-3)

    def loss_fn(params):
        hidden = batch
        for i in range(3):
            hidden = jnp.tanh(hidden @ params[f"w{i}"])
        return jnp.mean(hidden**2)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    state = (params, tx.init(params))
    return step, state


def run_steps(step, state, count: int, metrics) -> tuple[float, float, tuple]:
    """Run `count` steps; return (steps per second, CPU seconds of this process per step, final state)."""
    params, opt_state = state
    cpu_started = time.process_time()
    started = time.perf_counter()
    previous = started
    for index in range(count):
        params, opt_state, scalars = step(params, opt_state)
        loss = float(scalars["loss"])
        grad_norm = float(scalars["grad_norm"])
        now = time.perf_counter()
        if metrics is not None:
            metrics.record_step(
                step=index + 1, loss=loss, kl_loss=loss, ce_loss=loss, learning_rate=1e-3, grad_norm=grad_norm,
                tokens=256, padding_tokens=0, global_tokens=256, step_seconds=now - previous, data_wait_seconds=0.0,
            )
        previous = now
    rate = count / (time.perf_counter() - started)
    return rate, (time.process_time() - cpu_started) / count, (params, opt_state)


def start_scraper(port: int, rate: float, seconds: float) -> subprocess.Popen:
    max_requests = int(rate * seconds) + 1
    return subprocess.Popen(
        [sys.executable, "-c", SCRAPER, f"http://127.0.0.1:{port}/metrics", str(rate), str(max_requests), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )


VARIANTS = ("baseline", "exporter", "scraped")


def measure_direct_costs(metrics, port: int, scrapes_per_second: float) -> tuple[float, float]:
    """Return (seconds per record_step call, CPU seconds of this process per served scrape).

    The scrapes come from a separate process while this thread sleeps, so the CPU time of
    this process over that period is the exporter's, plus what idle JAX threads use (an
    upper bound on the exporter's cost).
    """
    calls = 10_000
    started = time.perf_counter()
    for index in range(calls):
        metrics.record_step(
            step=index, loss=1.0, kl_loss=1.0, ce_loss=1.0, learning_rate=1e-3, grad_norm=1.0,
            tokens=256, padding_tokens=0, global_tokens=256, step_seconds=0.1, data_wait_seconds=0.0,
        )
    per_call = (time.perf_counter() - started) / calls

    scraper = start_scraper(port, scrapes_per_second, 10.0)
    cpu_started = time.process_time()
    output, _ = scraper.communicate(timeout=30)
    served = int(output.strip() or 0)
    per_scrape = (time.process_time() - cpu_started) / max(served, 1)
    return per_call, per_scrape


def run_variant(variant: str, step, state, args: argparse.Namespace, metrics, port: int) -> tuple[float, float, tuple, int]:
    """Run one variant for args.steps steps; return (steps/s, CPU s/step, state, scrapes served)."""
    if variant == "baseline":
        rate, cpu, state = run_steps(step, state, args.steps, None)
        return rate, cpu, state, 0
    if variant == "exporter":
        rate, cpu, state = run_steps(step, state, args.steps, metrics)
        return rate, cpu, state, 0

    # Bounded to 60 s or the request count that rate allows in that time.
    scraper = start_scraper(port, args.scrapes_per_second, 60.0)
    time.sleep(0.5)  # let the scraper's interpreter start before timing
    try:
        rate, cpu, state = run_steps(step, state, args.steps, metrics)
    finally:
        scraper.terminate()
        output, _ = scraper.communicate(timeout=10)
    return rate, cpu, state, int(output.strip() or 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round (count)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of the three variants (count)")
    parser.add_argument("--scrapes-per-second", type=float, default=10.0, help="scrape rate of the scraped variant")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from distill.config import MetricsConfig
    from distill.metrics import TrainingMetrics, WorkerIdentity

    step, state = build_step()
    _, _, state = run_steps(step, state, 20, None)  # compile and warm up

    metrics = TrainingMetrics(MetricsConfig(host="127.0.0.1", port=0), WorkerIdentity("bench", 0, 0))
    port = metrics.start()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body_bytes = len(response.read())

    record_seconds, scrape_cpu_seconds = measure_direct_costs(metrics, port, args.scrapes_per_second)

    rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    cpu_per_step: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    scrapes = 0
    try:
        for round_index in range(args.rounds):
            # Rotate the order so that no variant always runs first or last in a round.
            order = VARIANTS[round_index % 3:] + VARIANTS[: round_index % 3]
            for variant in order:
                rate, cpu, state, served = run_variant(variant, step, state, args, metrics, port)
                rates[variant].append(rate)
                cpu_per_step[variant].append(cpu)
                scrapes += served
            logger.info(
                "round %d/%d: baseline %.2f, exporter %.2f, scraped %.2f steps/s",
                round_index + 1, args.rounds, rates["baseline"][-1], rates["exporter"][-1], rates["scraped"][-1],
            )
    finally:
        metrics.stop(final_scrape_timeout_seconds=0)

    print(f"\nCommand: python bench/metrics_overhead.py --steps {args.steps} --rounds {args.rounds} "
          f"--scrapes-per-second {args.scrapes_per_second:g}")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"JAX on CPU; load average at the end {os.getloadavg()[0]:.1f}")
    print(f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"/metrics body: {body_bytes} bytes; scrapes served during the scraped variant: {scrapes}\n")
    baseline_step = 1 / statistics.median(rates["baseline"])
    print(
        f"Direct cost: record_step {1e6 * record_seconds:.1f} us per call "
        f"({100 * record_seconds / baseline_step:.3f}% of the median baseline step of {1000 * baseline_step:.0f} ms); "
        f"one scrape {1000 * scrape_cpu_seconds:.2f} ms of CPU, so {args.scrapes_per_second:g} scrapes/s use "
        f"{100 * args.scrapes_per_second * scrape_cpu_seconds:.2f}% of one core\n"
    )
    print("| variant | median steps/s | median CPU ms/step | steps/s vs baseline, same round: median (quartiles) |")
    print("|---|---|---|---|")
    for name in VARIANTS:
        # Each round's variants ran back to back, so the per-round ratio cancels slow load changes.
        ratios = [100 * (rate / base - 1) for rate, base in zip(rates[name], rates["baseline"])]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        print(
            f"| {name} | {statistics.median(rates[name]):.2f} | {1000 * statistics.median(cpu_per_step[name]):.1f} | "
            f"{statistics.median(ratios):+.2f}% ({quartiles[0]:+.2f}% to {quartiles[2]:+.2f}%) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
