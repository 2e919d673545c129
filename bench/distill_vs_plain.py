"""Benchmark: distillation (alpha 0.9) against plain next-token training (alpha 0) of the same student.

Runs `distill train` three times on the demo config (SmolLM2-135M teacher, KJV corpus):

1. kd:           the config as it is (alpha 0.9), the real teacher.
2. plain-steps:  alpha 0 for the same number of steps. The teacher is replaced by a random
                 1-layer stand-in with the same tokenizer, so its forward pass costs almost
                 nothing and the step time is the student's own.
3. plain-time:   alpha 0 for as many steps as fit in the kd run's training time, from the
                 plain-steps run's measured step time.

It reports held-out perplexity (student, and the teacher from the kd run), training time, the
teacher's share of the kd step time ((kd step - plain step) / kd step), and each run's peak RSS.

    .venv/bin/python bench/distill_vs_plain.py --config examples/local-cpu.yaml --output bench/results/distill_vs_plain.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def make_stand_in_teacher(real_teacher: Path, folder: Path) -> Path:
    """Save a random 1-layer Llama that shares the real teacher's tokenizer and vocabulary."""
    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    real = AutoConfig.from_pretrained(real_teacher)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=real.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (real_teacher / name).is_file():
            shutil.copy(real_teacher / name, folder / name)
    return folder


def run(name: str, config: dict, workdir: Path) -> dict:
    """Run one `distill train`; return its summary with wall time and peak RSS."""
    run_dir = workdir / name
    run_dir.mkdir(parents=True)
    config["training"]["save_directory"] = str(run_dir / "checkpoints")
    config["training"]["save_interval_steps"] = None
    config["metrics"] = {"host": "127.0.0.1", "port": 0}
    config["logging"] = {"interval_steps": 20}
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    env = dict(os.environ, PYTHONUNBUFFERED="1", DISTILL_CACHE_DIR=str(run_dir / "cache"))
    started = time.monotonic()
    with (run_dir / "log.txt").open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "distill", "train", str(config_path)], stdout=log, stderr=subprocess.STDOUT, env=env)
        _pid, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"run {name} failed; see {run_dir / 'log.txt'}")
    summary = json.loads((run_dir / "checkpoints" / "summary.json").read_text())
    summary["name"] = name
    summary["alpha"] = config["distillation"]["alpha"]
    summary["process_seconds"] = round(time.monotonic() - started, 1)
    summary["peak_rss_gib"] = round(usage.ru_maxrss / 2**20, 2)
    summary["step_seconds"] = round(summary["train_seconds"] / summary["steps"], 3)
    print(f"{name}: {json.dumps(summary)}", flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "examples" / "local-cpu.yaml"))
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "distill_vs_plain.json"))
    parser.add_argument("--seed", type=int, default=0, help="training seed (student initialisation and data order)")
    args = parser.parse_args()

    base = yaml.safe_load(Path(args.config).read_text())
    base["training"]["seed"] = args.seed
    real_teacher = Path(base["teacher"]["path"])
    workdir = Path(tempfile.mkdtemp(prefix="distill-bench-"))

    kd = run("kd", json.loads(json.dumps(base)), workdir)

    stand_in = make_stand_in_teacher(real_teacher, workdir / "stand-in-teacher")
    plain = json.loads(json.dumps(base))
    plain["distillation"]["alpha"] = 0.0
    plain["teacher"]["path"] = str(stand_in)
    plain["evaluation"]["include_teacher"] = False
    plain_steps = run("plain-steps", json.loads(json.dumps(plain)), workdir)

    equal_time_steps = max(1, round(kd["train_seconds"] / plain_steps["step_seconds"]))
    plain["training"]["max_training_steps"] = equal_time_steps
    plain_time = run("plain-time", plain, workdir)

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'unknown CPU'}",
        "teacher_share_of_kd_step": round((kd["step_seconds"] - plain_steps["step_seconds"]) / kd["step_seconds"], 3),
        "runs": [kd, plain_steps, plain_time],
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
