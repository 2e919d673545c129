"""Shared fixtures: the demo assets and small experiment configs built on them."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / ".assets"


@pytest.fixture(scope="session")
def assets() -> Path:
    """The real demo teacher (SmolLM2-135M) and KJV corpus, prepared once per machine."""
    from distill.assets import prepare_assets

    return prepare_assets(ASSETS)


@pytest.fixture(scope="session")
def random_teacher(assets, tmp_path_factory) -> Path:
    """Save a random 2-layer Llama that uses the demo teacher's tokenizer, as an HF folder.

    Its forward pass costs almost nothing, for tests about processes rather than quality.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("random-teacher")
    tokenizer = AutoTokenizer.from_pretrained(assets / "smollm2-135m")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=True, rope_theta=100000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_config(save_directory: Path, **sections) -> dict:
    """A config that distills the real SmolLM2 teacher into a 2-layer student in seconds per step."""
    config = {
        "experiment": {"name": "test"},
        "teacher": {"path": str(ASSETS / "smollm2-135m"), "dtype": "float32"},
        "student": {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rope_theta": 100000.0,
            "max_position_embeddings": 512,
            "dtype": "float32",
            "param_dtype": "float32",
        },
        "data": {
            "sources": [{"type": "jsonl", "path": str(ASSETS / "kjv" / "train.jsonl"), "content_field": "text"}],
            "sequence_length": 64,
        },
        "distillation": {"temperature": 1.0, "alpha": 0.9},
        "training": {
            "total_batch_size": 2,
            "learning_rate": 3.0e-3,
            "warmup_steps": 1,
            "schedule": "constant",
            "max_training_steps": 6,
            "save_directory": str(save_directory),
            "save_interval_steps": 3,
        },
        "metrics": {"host": "127.0.0.1", "port": 0},
        "logging": {"interval_steps": 1},
    }
    for name, values in sections.items():
        merged = copy.deepcopy(config.get(name, {}))
        merged.update(values)
        config[name] = merged
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def subprocess_env(tmp_path) -> dict:
    """Environment for `distill` subprocesses: unbuffered output and a per-test compile cache."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["DISTILL_CACHE_DIR"] = str(tmp_path / "cache")
    env["JAX_PLATFORMS"] = "cpu"
    return env
