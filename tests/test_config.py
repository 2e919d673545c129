"""Config validation: every bad input is rejected before any model loads, with its own message."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from distill.config import ConfigError, parse_config

VALID = {
    "teacher": {"path": "Qwen/Qwen3-14B"},
    "student": {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
    "data": {"sources": [{"type": "hub", "path": "tiiuae/falcon-refinedweb", "content_field": "content"}], "sequence_length": 128},
    "training": {"total_batch_size": 8, "max_training_steps": 100, "save_directory": "gs://bucket/run", "save_interval_steps": 10},
}


def with_change(path: str, value) -> dict:
    """Return VALID with the dotted `path` set to `value` (None deletes the key)."""
    config = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return config


def test_valid_config_resolves_defaults():
    config = parse_config(VALID)
    assert config.distillation.temperature == 2.0
    assert config.distillation.alpha == 0.9
    assert config.training.total_steps == 100
    assert config.data.streaming is True


BAD_CASES = [
    ("unknown top-level key", with_change("trainer", {"x": 1}), ["trainer: unknown key", "valid keys here: data"]),
    ("misspelled nested key", with_change("student.num_layers", 4), ["student.num_layers: unknown key", "num_hidden_layers"]),
    ("unknown key in a source", {**VALID, "data": {**VALID["data"], "sources": [{**VALID["data"]["sources"][0], "feld": "x"}]}}, ["data.sources[0].feld: unknown key", "content_field"]),
    ("alpha above 1", with_change("distillation.alpha", 2), ["distillation.alpha: invalid value 2", "less than or equal to 1"]),
    ("alpha below 0", with_change("distillation.alpha", -0.1), ["distillation.alpha: invalid value -0.1", "greater than or equal to 0"]),
    ("zero temperature", with_change("distillation.temperature", 0), ["distillation.temperature: invalid value 0", "greater than 0"]),
    ("negative temperature", with_change("distillation.temperature", -1.0), ["distillation.temperature: invalid value -1.0"]),
    ("stream without steps", with_change("training.max_training_steps", None) | {"training": {k: v for k, v in VALID["training"].items() if k not in ("max_training_steps", "save_interval_steps")}}, ["data.streaming is true", "max_training_steps", "per_epoch_training_steps"]),
    ("empty source list", with_change("data.sources", []), ["data.sources", "the source list is empty"]),
    ("zero batch size", with_change("training.total_batch_size", 0), ["training.total_batch_size: invalid value 0", "greater than 0"]),
    ("negative batch size", with_change("training.total_batch_size", -4), ["training.total_batch_size: invalid value -4"]),
    ("zero sequence length", with_change("data.sequence_length", 0), ["data.sequence_length: invalid value 0"]),
    ("negative sequence length", with_change("data.sequence_length", -128), ["data.sequence_length: invalid value -128"]),
    ("save interval beyond run", with_change("training.save_interval_steps", 500), ["training.save_interval_steps=500 is larger than the run (100 steps)", "at most 100"]),
    ("source without location", {**VALID, "data": {**VALID["data"], "sources": [{"type": "jsonl", "content_field": "text"}]}}, ["data.sources[0]", "exactly one of `path` or `files`"]),
    ("unknown source type", {**VALID, "data": {**VALID["data"], "sources": [{"type": "csv", "path": "x"}]}}, ["data.sources[0].type: invalid value 'csv'", "'jsonl', 'parquet', 'text' or 'hub'"]),
    ("kv heads do not divide", with_change("student.num_key_value_heads", 3), ["student", "num_key_value_heads=3 does not divide num_attention_heads=4", "[1, 2, 4]"]),
    ("missing teacher", with_change("teacher", None), ["teacher: required key is missing"]),
    ("wrong type", with_change("training.learning_rate", "fast"), ["training.learning_rate: invalid value 'fast'", "valid number"]),
]


@pytest.mark.parametrize("raw,fragments", [case[1:] for case in BAD_CASES], ids=[case[0] for case in BAD_CASES])
def test_bad_config_rejected(raw, fragments):
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message


def test_bad_cases_have_distinct_messages():
    messages = []
    for _name, raw, _fragments in BAD_CASES:
        with pytest.raises(ConfigError) as caught:
            parse_config(raw)
        messages.append(str(caught.value))
    assert len(set(messages)) == len(messages)


def test_non_streaming_needs_no_steps():
    raw = with_change("data.streaming", False)
    raw["training"] = {k: v for k, v in raw["training"].items() if k not in ("max_training_steps", "save_interval_steps")}
    config = parse_config(raw)
    assert config.training.total_steps is None


def test_epoch_steps_set_run_length():
    raw = with_change("training.max_training_steps", None)
    raw["training"]["per_epoch_training_steps"] = 98_000_000
    raw["training"]["num_epochs"] = 2
    assert parse_config(raw).training.total_steps == 196_000_000


def test_validate_cli_prints_resolved_config(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(VALID))
    result = subprocess.run([sys.executable, "-m", "distill", "validate", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["distillation"]["temperature"] == 2.0
    assert resolved["teacher"]["fidelity_check"]["enabled"] is True


def test_validate_cli_exit_code_on_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_change("distillation.alpha", 2)))
    result = subprocess.run([sys.executable, "-m", "distill", "validate", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "distillation.alpha: invalid value 2" in result.stderr


def test_validate_cli_missing_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "distill", "validate", str(tmp_path / "absent.yaml")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "not found" in result.stderr


def test_validate_loads_no_model(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(VALID))
    code = (
        "import sys; from distill.cli import main; main(['validate', sys.argv[1]]); "
        "heavy = [m for m in ('jax', 'easydel', 'torch', 'transformers') if m in sys.modules]; "
        "print('HEAVY', heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=False)
    assert "HEAVY []" in result.stdout


def test_example_configs_are_valid():
    from pathlib import Path

    from distill.config import load_config

    examples = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        load_config(path)
