"""`distill train`: join the runtime, open data and models, check them, then train and report.

Order matters: everything that can reject the run cheaply (config, data sources, vocabulary,
mesh divisibility, teacher fidelity) happens before the first step, so a bad input costs
seconds, not a slice-hour, and never touches the checkpoints already saved.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill import runtime
from distill.config import Config
from distill.exitcodes import ExitCode, InvalidInputError

logger = logging.getLogger(__name__)


@dataclass
class RunTotals:
    """Counters that outlive one process: restored from the checkpoint marker on resume."""

    tokens: int = 0
    padding_tokens: int = 0


def _prepare_environment(config: Config) -> None:
    # easydel initialises jax.distributed on import unless ENABLE_DISTRIBUTED_INIT=0, and
    # distill.runtime is the one place that starts the distributed runtime.
    os.environ["ENABLE_DISTRIBUTED_INIT"] = "0"
    # Keep EasyDeL's compile cache out of $HOME (read-only in the container) and per run, since
    # XLA:CPU entries compiled on another CPU model can crash with SIGILL.
    cache = Path(os.environ.get("DISTILL_CACHE_DIR", Path.home() / ".cache" / "distill"))
    os.environ.setdefault("COMPILE_FUNC_DIR", str(cache / "easydel-compile"))


def _restart_attempt() -> int | None:
    """Return JobSet's restart count when the chart passes it to the pod, else None."""
    value = os.environ.get("DISTILL_RESTART_ATTEMPT", "")
    return int(value) if value.isdigit() else None


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


class _Prefetcher:
    """Build global batches on a background thread, so tokenization overlaps the step."""

    def __init__(self, batch_iterator, depth: int = 2) -> None:
        self._iterator = batch_iterator
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distill-data", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._iterator:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the training thread and re-raised there
            self._queue.put(error)

    def next(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self._stop.set()


class _StopRequest:
    """Remember a SIGTERM (preemption or pod deletion) so the loop can checkpoint and exit."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        logger.warning("received %s: finishing the current step, then saving a checkpoint", self.signal_name)


def _count_blocks(config: Config, tokenizer) -> int:
    from distill.data import TextStream

    stream = TextStream(config.data, tokenizer, seed=config.training.seed)
    blocks = 0
    passes_before = list(stream.position.passes)
    for _block in stream.blocks():
        blocks += 1
        if stream.position.passes != passes_before:
            return blocks - 1
    return blocks


def _resolve_total_steps(config: Config, tokenizer) -> int:
    total = config.training.total_steps
    if total is not None:
        return total
    blocks = _count_blocks(config, tokenizer)
    total = (blocks // config.training.total_batch_size) * config.training.num_epochs
    if total == 0:
        raise InvalidInputError(
            f"the data contains {blocks} blocks of {config.data.sequence_length} tokens, fewer than one batch of "
            f"{config.training.total_batch_size}; add data or lower training.total_batch_size"
        )
    interval = config.training.save_interval_steps
    if interval is not None and interval > total:
        raise InvalidInputError(
            f"training.save_interval_steps={interval} is larger than the run ({total} steps from {blocks} blocks); "
            f"set it to at most {total}"
        )
    logger.info("non-streaming data: %d blocks give %d steps", blocks, total)
    return total


def _check_mesh(config: Config, layout: runtime.ProcessLayout, device_count: int) -> int:
    tensor_parallel = config.mesh.tensor_parallel_size
    if device_count % tensor_parallel != 0:
        raise InvalidInputError(
            f"mesh.tensor_parallel_size={tensor_parallel} does not divide the {device_count} devices; "
            f"choose a divisor of {device_count}"
        )
    data_parallel = device_count // tensor_parallel
    batch = config.training.total_batch_size
    for divisor, what in ((data_parallel, "data-parallel size"), (layout.num_processes, "process count")):
        if batch % divisor != 0:
            raise InvalidInputError(
                f"training.total_batch_size={batch} is not divisible by the {what} {divisor}; "
                f"use a multiple of {divisor}"
            )
    return data_parallel


def _evaluate(nll_fn, mesh, state, blocks, batch_size: int, layout) -> float:
    from distill.data import local_rows
    from distill.training.step import global_batch

    total_nll = 0.0
    total_tokens = 0.0
    usable = len(blocks) - len(blocks) % batch_size
    for start in range(0, usable, batch_size):
        rows = blocks[start : start + batch_size]
        batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
        local = local_rows(batch, layout.process_id, layout.num_processes)
        arrays = global_batch(mesh, local, batch_size)
        nll, count = nll_fn(state, arrays["input_ids"], arrays["attention_mask"], arrays["labels"])
        total_nll += float(nll)
        total_tokens += float(count)
    return float(np.exp(total_nll / max(total_tokens, 1.0)))


def run_training(config: Config, config_path: str | None = None) -> int:
    """Run or resume the experiment; return the process exit code."""
    started = time.monotonic()
    _prepare_environment(config)
    layout = runtime.detect_layout(config.runtime, environ=os.environ)
    runtime.initialize_runtime(layout, timeout_seconds=config.runtime.initialization_timeout_seconds)

    import jax

    from distill.checkpoints import CheckpointStore
    from distill.data import StreamPosition, TextStream, batches, fixed_blocks, local_rows
    from distill.fidelity import check_teacher_fidelity
    from distill.flops import ModelShape, peak_flops_per_chip, student_shape, training_flops_per_token
    from distill.metrics import TrainingMetrics, WorkerIdentity
    from distill.models import build_student, count_parameters, load_teacher, load_tokenizer
    from distill.sharding import replicated_host_array, spread_over_mesh
    from distill.training.step import (
        build_nll_fn,
        build_train_step,
        global_batch,
        learning_rate_schedule,
        optimizer,
    )

    training = config.training
    logger.info(
        "distill run %r starting from %s on %d %s device(s) in %d process(es)",
        config.experiment.name, config_path or "<config>", jax.device_count(), jax.devices()[0].platform,
        layout.num_processes,
    )

    # Inputs first: tokenizer, data sources and run length are cheap to check.
    tokenizer = load_tokenizer(config)
    vocab_size = len(tokenizer)
    total_steps = _resolve_total_steps(config, tokenizer)
    data_parallel = _check_mesh(config, layout, jax.device_count())
    fidelity_blocks = fixed_blocks(
        config.data, config.data.sources, tokenizer, config.teacher.fidelity_check.num_sequences
    ) if config.teacher.fidelity_check.enabled else []
    eval_blocks = []
    if config.evaluation.sources and config.evaluation.num_sequences > 0:
        eval_blocks = fixed_blocks(config.data, config.evaluation.sources, tokenizer, config.evaluation.num_sequences)

    # Models: the teacher (checked against transformers), then a fresh student on its mesh.
    teacher = load_teacher(config.teacher, vocab_size, config.mesh.tensor_parallel_size)
    teacher_hidden = teacher.module.config.hidden_size
    if config.distillation.hidden_state_loss.enabled and teacher_hidden != config.student.hidden_size:
        raise InvalidInputError(
            f"distillation.hidden_state_loss needs equal hidden sizes, but the teacher has {teacher_hidden} and "
            f"student.hidden_size is {config.student.hidden_size}; set student.hidden_size={teacher_hidden} or "
            f"disable the hidden-state loss"
        )
    check_teacher_fidelity(config.teacher.fidelity_check, teacher.module, teacher.folder, fidelity_blocks, vocab_size)
    student = build_student(config.student, vocab_size, config.mesh.tensor_parallel_size, training.seed)
    mesh = student.mesh
    teacher_parameters = count_parameters(teacher.module)
    student_parameters = count_parameters(student)

    schedule = learning_rate_schedule(training, total_steps)
    state = student.to_state().init_tx(optimizer(training, schedule))
    # EasyDeL starts `step` as a Python int. As a weakly typed scalar it would make the second
    # call of the jitted step compile again, so it becomes an int32 replicated over the whole
    # mesh (every process's devices, as the step's sharding expects).
    state = state.replace(step=replicated_host_array(mesh, np.asarray(state.step, dtype=np.int32)))
    state = spread_over_mesh(state, mesh)
    teacher_state = spread_over_mesh(teacher.module.to_state(), mesh)
    del student

    # Resume from the newest committed checkpoint, if any.
    store = CheckpointStore(training.save_directory, training.checkpoints_to_keep, layout.is_writer)
    latest = store.latest()
    position = None
    totals = RunTotals()
    start_step = 0
    if latest is not None:
        target = {"graphstate": state.graphstate, "opt_state": state.opt_state, "step": state.step}
        restored, data_position = store.restore(latest, target)
        state = state.replace(graphstate=restored["graphstate"], opt_state=restored["opt_state"], step=restored["step"])
        position = StreamPosition.from_json(data_position["position"])
        totals = RunTotals(tokens=data_position["tokens"], padding_tokens=data_position["padding_tokens"])
        start_step = latest.step
        logger.info("resumed from checkpoint %s at step %d (%d tokens consumed so far)", latest.path, start_step, totals.tokens)
    else:
        logger.info("no committed checkpoint under %s: starting from step 0", training.save_directory)

    identity = WorkerIdentity(config.experiment.name, layout.worker_index, layout.slice_index)
    metrics = TrainingMetrics(config.metrics, identity, throughput_window_steps=config.logging.interval_steps)
    metrics.set_info(
        num_slices=layout.num_slices,
        hosts_per_slice=layout.hosts_per_slice,
        accelerator=layout.accelerator,
        tpu_type=layout.tpu_type or "",
        total_steps=total_steps,
        restart_attempt=_restart_attempt(),
    )
    flops_per_token = training_flops_per_token(
        ModelShape.from_hf_config({**teacher.hf_config, "vocab_size": vocab_size}),
        student_shape(config.student, vocab_size),
        config.data.sequence_length,
    )
    metrics.set_flops_per_token(
        flops_per_token,
        total_chips=jax.device_count(),
        peak_flops_per_chip=peak_flops_per_chip(layout.tpu_type if layout.accelerator == "tpu" else None),
    )
    metrics.start()
    if latest is not None:
        metrics.record_resume(step=start_step, checkpoint_timestamp=data_position.get("committed_at"))

    logger.info(
        "banner: experiment=%s teacher=%s (%.1fM parameters, %s) student=Qwen3 %d layers x %d hidden (%.1fM "
        "parameters) vocabulary=%d mesh=%s data_parallel=%d batch=%d x %d tokens steps=%d T=%.2f alpha=%.2f lr=%.2e "
        "schedule=%s save=%s every %s steps",
        config.experiment.name, config.teacher.path, teacher_parameters / 1e6, config.teacher.dtype,
        config.student.num_hidden_layers, config.student.hidden_size, student_parameters / 1e6, vocab_size,
        dict(mesh.shape), data_parallel, training.total_batch_size, config.data.sequence_length, total_steps,
        config.distillation.temperature, config.distillation.alpha, training.learning_rate, training.schedule,
        training.save_directory, training.save_interval_steps or "end",
    )

    if start_step >= total_steps:
        logger.info("run already complete at step %d of %d; nothing to train", start_step, total_steps)
        metrics.stop()
        return ExitCode.OK

    train_step = build_train_step(config, schedule, state, teacher_state, mesh)
    stream = TextStream(config.data, tokenizer, seed=training.seed, position=position)
    prefetcher = _Prefetcher(batches(stream, training.total_batch_size))
    stop = _StopRequest()
    stop.install()
    history_path = _history_path(training.save_directory, layout)

    def save(step: int, position_json: dict[str, Any]) -> None:
        tree = {"graphstate": state.graphstate, "opt_state": state.opt_state, "step": state.step}
        data_position = {"position": position_json, "tokens": totals.tokens, "padding_tokens": totals.padding_tokens}
        try:
            seconds = store.save(step, tree, data_position, {"experiment": config.experiment.name})
        except Exception:
            metrics.record_checkpoint(step=step, duration_seconds=0.0, succeeded=False)
            logger.exception("checkpoint at step %d failed", step)
            raise
        metrics.record_checkpoint(step=step, duration_seconds=seconds, succeeded=True)
        logger.info("checkpoint for step %d committed to %s in %.1fs", step, training.save_directory, seconds)

    interval = config.logging.interval_steps
    window = {"tokens": 0, "seconds": 0.0, "steps": 0, "wait": 0.0}
    last_saved = start_step
    step = start_step
    last_position = None
    last_scalars: dict[str, float] = {}
    loop_started = time.monotonic()
    try:
        with mesh:
            while step < total_steps:
                wait_started = time.monotonic()
                batch, last_position = prefetcher.next()
                data_wait = time.monotonic() - wait_started

                step_started = time.monotonic()
                local = local_rows(batch, layout.process_id, layout.num_processes)
                arrays = global_batch(mesh, local, training.total_batch_size)
                state, scalars = train_step(state, arrays, teacher_state)
                last_scalars = {key: float(value) for key, value in scalars.items()}
                step_seconds = time.monotonic() - step_started
                step += 1

                global_tokens = int(batch["attention_mask"].sum())
                local_tokens = int(local["attention_mask"].sum())
                totals.tokens += global_tokens
                totals.padding_tokens += int(batch["attention_mask"].size) - global_tokens
                metrics.record_step(
                    step=step,
                    loss=last_scalars["loss"],
                    kl_loss=last_scalars["kl_loss"],
                    ce_loss=last_scalars["ce_loss"],
                    learning_rate=last_scalars["learning_rate"],
                    grad_norm=last_scalars["grad_norm"],
                    tokens=local_tokens,
                    padding_tokens=int(local["attention_mask"].size) - local_tokens,
                    global_tokens=global_tokens,
                    step_seconds=step_seconds + data_wait,
                    data_wait_seconds=data_wait,
                )
                window["tokens"] += global_tokens
                window["seconds"] += step_seconds + data_wait
                window["wait"] += data_wait
                window["steps"] += 1

                if not np.isfinite(last_scalars["loss"]):
                    logger.error("loss is %s at step %d on worker %d", last_scalars["loss"], step, layout.process_id)

                if step % interval == 0 or step == total_steps:
                    _log_progress(step, total_steps, last_scalars, window)
                    _append_history(history_path, step, last_scalars, window, totals)
                    window = {"tokens": 0, "seconds": 0.0, "steps": 0, "wait": 0.0}

                due = training.save_interval_steps is not None and step % training.save_interval_steps == 0
                if due and step < total_steps:
                    save(step, last_position.to_json())
                    last_saved = step
                if stop.signal_name is not None:
                    if step > last_saved:
                        save(step, last_position.to_json())
                    logger.warning("stopped by %s after step %d; the next start resumes from it", stop.signal_name, step)
                    metrics.stop(final_scrape_timeout_seconds=0)
                    return ExitCode.PREEMPTED

            if step > last_saved:
                save(step, last_position.to_json())
    finally:
        prefetcher.stop()
        train_seconds = time.monotonic() - loop_started

    report = {
        "experiment": config.experiment.name,
        "steps": step,
        "steps_this_process": step - start_step,
        "resumed_from_step": start_step if latest is not None else None,
        "tokens": totals.tokens,
        "padding_tokens": totals.padding_tokens,
        "final_loss": last_scalars.get("loss"),
        "final_kl_loss": last_scalars.get("kl_loss"),
        "final_ce_loss": last_scalars.get("ce_loss"),
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.monotonic() - started, 2),
        "teacher_parameters": teacher_parameters,
        "student_parameters": student_parameters,
    }
    if eval_blocks:
        nll_fn = build_nll_fn(mesh)
        with mesh:
            report["student_heldout_perplexity"] = _evaluate(
                nll_fn, mesh, state, eval_blocks, config.evaluation.batch_size, layout
            )
            if config.evaluation.include_teacher:
                report["teacher_heldout_perplexity"] = _evaluate(
                    nll_fn, mesh, teacher_state, eval_blocks, config.evaluation.batch_size, layout
                )
        report["heldout_sequences"] = len(eval_blocks) - len(eval_blocks) % config.evaluation.batch_size
    _write_summary(training.save_directory, layout, report)
    _log_summary(report)
    metrics.stop()
    return ExitCode.OK


def _log_progress(step: int, total: int, scalars: dict[str, float], window: dict[str, float]) -> None:
    seconds = max(window["seconds"], 1e-9)
    step_time = seconds / max(window["steps"], 1)
    hidden = f" hidden={scalars['hidden_state_loss']:.4f}" if "hidden_state_loss" in scalars else ""
    logger.info(
        "step %d/%d loss=%.4f kl=%.4f ce=%.4f%s tokens/s=%.0f step_time=%.2fs data_wait=%.2fs lr=%.3e grad_norm=%.3f eta=%s",
        step, total, scalars["loss"], scalars["kl_loss"], scalars["ce_loss"], hidden, window["tokens"] / seconds,
        step_time, window["wait"] / max(window["steps"], 1), scalars["learning_rate"], scalars["grad_norm"],
        _format_duration((total - step) * step_time),
    )


def _history_path(save_directory: str, layout: runtime.ProcessLayout) -> Path | None:
    if "://" in save_directory or not layout.is_writer:
        return None
    return Path(save_directory) / "history.jsonl"


def _append_history(path: Path | None, step: int, scalars: dict[str, float], window: dict[str, float], totals: RunTotals) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"step": step, **scalars, "tokens": totals.tokens, "tokens_per_second": window["tokens"] / max(window["seconds"], 1e-9)}
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _write_summary(save_directory: str, layout: runtime.ProcessLayout, report: dict[str, Any]) -> None:
    if not layout.is_writer:
        return
    import fsspec

    filesystem, root = fsspec.core.url_to_fs(save_directory)
    filesystem.makedirs(root, exist_ok=True)
    with filesystem.open(root.rstrip("/") + "/summary.json", "w") as handle:
        json.dump(report, handle, indent=2)


def _log_summary(report: dict[str, Any]) -> None:
    logger.info(
        "finished: %d steps, %d tokens (%d padding) in %s; final loss %.4f (kl %.4f, ce %.4f)",
        report["steps"], report["tokens"], report["padding_tokens"], _format_duration(report["train_seconds"]),
        report["final_loss"] if report["final_loss"] is not None else float("nan"),
        report["final_kl_loss"] if report["final_kl_loss"] is not None else float("nan"),
        report["final_ce_loss"] if report["final_ce_loss"] is not None else float("nan"),
    )
    if "student_heldout_perplexity" in report:
        teacher = report.get("teacher_heldout_perplexity")
        logger.info(
            "held-out perplexity on %d sequences: student %.2f%s",
            report["heldout_sequences"], report["student_heldout_perplexity"],
            f", teacher {teacher:.2f}" if teacher is not None else "",
        )
