"""The optional hidden-state loss: it trains when sizes match and is rejected before training when not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import tiny_config, write_config

pytestmark = pytest.mark.slow


def run_train(config: dict, tmp_path) -> subprocess.CompletedProcess:
    path = write_config(tmp_path / "config.yaml", config)
    env = dict(os.environ, PYTHONUNBUFFERED="1", DISTILL_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run(
        [sys.executable, "-m", "distill", "train", str(path)], capture_output=True, text=True, env=env, timeout=600
    )


def test_hidden_state_loss_trains(random_teacher, tmp_path):
    config = tiny_config(
        tmp_path / "checkpoints",
        teacher={"path": str(random_teacher)},
        distillation={"temperature": 1.0, "alpha": 0.9, "hidden_state_loss": {"enabled": True, "weight": 0.5}},
        training={"max_training_steps": 2, "save_interval_steps": None},
    )
    result = run_train(config, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "finished: 2 steps" in result.stdout
    assert " hidden=" in result.stdout


def test_hidden_state_loss_needs_equal_sizes(random_teacher, tmp_path):
    config = tiny_config(
        tmp_path / "checkpoints",
        teacher={"path": str(random_teacher)},
        student={"hidden_size": 32},
        distillation={"hidden_state_loss": {"enabled": True}},
    )
    result = run_train(config, tmp_path)
    assert result.returncode == 3
    assert "needs equal hidden sizes, but the teacher has 64 and student.hidden_size is 32" in result.stdout + result.stderr
    assert not (tmp_path / "checkpoints").exists()
