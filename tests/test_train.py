"""A real few-step distillation of the SmolLM2 teacher on KJV text, as `distill train` processes.

Covers: the loss falls, progress lines appear, checkpoints commit, and /metrics serves the logged
loss while the run is live. SIGTERM checkpoints and exits 76, and a restart then reproduces the
losses of an uninterrupted run, so model, optimizer and data position are all restored.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import tiny_config, write_config

pytestmark = pytest.mark.slow

STEP_LINE = re.compile(r"step (\d+)/(\d+) loss=([0-9.]+) kl=([0-9.]+) ce=([0-9.]+) tokens/s=(\d+)")
PORT_LINE = re.compile(r"metrics server started on 127\.0\.0\.1:(\d+)")
METRIC_LINE = re.compile(r"^(distill_[a-z_]+)\{[^}]*\} ([0-9.e+-]+)$", re.MULTILINE)


class Run:
    """A `distill train` subprocess whose output is read line by line."""

    def __init__(self, config_path: Path, env: dict) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "distill", "train", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )

    def read_until(self, pattern: re.Pattern, timeout: float) -> re.Match | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                return None
            self.lines.append(line)
            match = pattern.search(line)
            if match:
                return match
        return None

    def finish(self, timeout: float) -> int:
        remaining, _ = self.process.communicate(timeout=timeout)
        self.lines.extend(remaining.splitlines(keepends=True))
        return self.process.returncode

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def losses(self) -> dict[int, float]:
        return {int(match.group(1)): float(match.group(3)) for match in STEP_LINE.finditer(self.text)}


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    return {name: float(value) for name, value in METRIC_LINE.findall(body)}


def run_to_end(config_path: Path, env: dict, timeout: float = 400) -> Run:
    run = Run(config_path, env)
    code = run.finish(timeout)
    assert code == 0, run.text[-3000:]
    return run


@pytest.fixture(scope="module")
def straight_run(assets, tmp_path_factory):
    """Nine uninterrupted steps, scraped over HTTP while running."""
    import os

    base = tmp_path_factory.mktemp("straight")
    config = tiny_config(
        base / "checkpoints",
        training={"max_training_steps": 9, "checkpoints_to_keep": 2},
        teacher={"fidelity_check": {"enabled": False}},
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1", DISTILL_CACHE_DIR=str(base / "cache"))
    run = Run(write_config(base / "config.yaml", config), env)
    port_match = run.read_until(PORT_LINE, timeout=240)
    assert port_match, run.text[-3000:]
    port = int(port_match.group(1))
    assert run.read_until(re.compile(r"step 2/9"), timeout=240), run.text[-3000:]
    scraped = scrape(port)
    code = run.finish(timeout=400)
    assert code == 0, run.text[-3000:]
    return {"run": run, "scraped": scraped, "save_directory": base / "checkpoints", "config": config}


def test_loss_falls(straight_run):
    losses = straight_run["run"].losses()
    assert sorted(losses) == list(range(1, 10))
    assert losses[9] < losses[1] - 0.5


def test_progress_lines_have_all_fields(straight_run):
    text = straight_run["run"].text
    line = next(line for line in text.splitlines() if "step 5/9" in line)
    for field in ("loss=", "kl=", "ce=", "tokens/s=", "step_time=", "lr=", "eta="):
        assert field in line
    assert "banner: experiment=test" in text
    assert "finished: 9 steps, 1152 tokens (0 padding)" in text


def test_ce_term_is_real(straight_run):
    # With labels shifted to next tokens, an untrained student's cross-entropy is near
    # ln(49152) = 10.8; a zero here would mean EasyDeL got no labels.
    first = STEP_LINE.search(straight_run["run"].text)
    assert 9.0 < float(first.group(5)) < 12.0


def test_metrics_match_logged_loss(straight_run):
    scraped = straight_run["scraped"]
    step = int(scraped["distill_last_completed_step"])
    logged = straight_run["run"].losses()[step]
    assert step >= 2
    assert abs(scraped["distill_loss"] - logged) < 1e-4
    assert "distill_tokens_total" in scraped


def test_checkpoints_committed_and_pruned(straight_run):
    folders = sorted(path.name for path in straight_run["save_directory"].glob("step-*"))
    assert folders == ["step-00000006", "step-00000009"]
    for name in folders:
        marker = json.loads((straight_run["save_directory"] / name / "COMMITTED").read_text())
        assert marker["step"] == int(name.split("-")[1])
        assert (straight_run["save_directory"] / name / "data.json").is_file()


def test_summary_counts_tokens(straight_run):
    summary = json.loads((straight_run["save_directory"] / "summary.json").read_text())
    assert summary["steps"] == 9
    assert summary["tokens"] == 9 * 2 * 64
    assert summary["padding_tokens"] == 0


def test_sigterm_checkpoints_then_resume_matches(straight_run, tmp_path):
    import os

    config = dict(straight_run["config"])
    config["training"] = {**config["training"], "save_directory": str(tmp_path / "checkpoints")}
    path = write_config(tmp_path / "config.yaml", config)
    env = dict(os.environ, PYTHONUNBUFFERED="1", DISTILL_CACHE_DIR=str(tmp_path / "cache"))

    first = Run(path, env)
    assert first.read_until(re.compile(r"step 4/9"), timeout=300), first.text[-3000:]
    first.process.send_signal(signal.SIGTERM)
    assert first.finish(timeout=120) == 76, first.text[-3000:]
    assert "received SIGTERM" in first.text
    stopped_at = max(first.losses())
    assert (tmp_path / "checkpoints" / f"step-{stopped_at:08d}" / "COMMITTED").is_file()

    second = run_to_end(path, env)
    assert f"resumed from checkpoint" in second.text
    assert f"at step {stopped_at}" in second.text
    expected = straight_run["run"].losses()
    resumed = second.losses()
    assert sorted(resumed) == list(range(stopped_at + 1, 10))
    for step, loss in resumed.items():
        assert abs(loss - expected[step]) < 2e-3, (step, loss, expected[step])
    summary = json.loads((tmp_path / "checkpoints" / "summary.json").read_text())
    assert summary["tokens"] == 9 * 2 * 64

    third = run_to_end(path, env)
    assert "run already complete at step 9 of 9" in third.text
