"""Optimizer, schedule and the jitted distillation step built on EasyDeL's `distillation_step`.

The loss is EasyDeL's: alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE, both terms
masked by attention_mask * (labels != -100). The wrapper only adds the global gradient norm and
returns plain scalars, so the loop can log them without touching EasyDeL's metric classes.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from distill.config import Config, TrainingConfig

logger = logging.getLogger(__name__)

BATCH_AXES = (("dp", "fsdp"), None)


def learning_rate_schedule(training: TrainingConfig, total_steps: int):
    import optax

    warmup = min(training.warmup_steps, total_steps)
    decay_steps = max(1, total_steps - warmup)
    if training.schedule == "constant":
        after = optax.constant_schedule(training.learning_rate)
    elif training.schedule == "linear":
        after = optax.linear_schedule(training.learning_rate, training.end_learning_rate, decay_steps)
    else:
        alpha = training.end_learning_rate / training.learning_rate
        after = optax.cosine_decay_schedule(training.learning_rate, decay_steps, alpha=alpha)
    if warmup == 0:
        return after
    ramp = optax.linear_schedule(0.0, training.learning_rate, warmup)
    return optax.join_schedules([ramp, after], boundaries=[warmup])


def optimizer(training: TrainingConfig, schedule):
    import optax

    if training.optimizer == "adamw":
        update = optax.adamw(schedule, weight_decay=training.weight_decay)
    elif training.optimizer == "lion":
        update = optax.lion(schedule, weight_decay=training.weight_decay)
    else:
        update = optax.adafactor(schedule, weight_decay_rate=training.weight_decay or None)
    if training.max_grad_norm is None:
        return update
    return optax.chain(optax.clip_by_global_norm(training.max_grad_norm), update)


def build_train_step(config: Config, schedule, student_state, teacher_state, mesh):
    """Return `step(student_state, batch, teacher_state) -> (student_state, scalars)`, jitted."""
    import jax
    import jax.numpy as jnp
    from easydel.trainers.distillation_trainer._fn import distillation_step
    from jax.sharding import NamedSharding, PartitionSpec

    distillation = config.distillation
    hidden_weight = distillation.hidden_state_loss.weight if distillation.hidden_state_loss.enabled else 0.0
    partition_spec = PartitionSpec(*BATCH_AXES)
    step_fn = functools.partial(
        distillation_step,
        loss_config=None,
        learning_rate_fn=schedule,
        partition_spec=partition_spec,
        gradient_accumulation_steps=1,
        is_training=True,
        temperature=distillation.temperature,
        alpha=distillation.alpha,
        hidden_state_weight=hidden_weight,
        logits_chunk_size=distillation.logits_chunk_size,
    )

    def train_step(state, batch, teacher):
        new_state, metrics = step_fn(state, batch, teacher)
        norms = jax.tree_util.tree_leaves(metrics.grad_norms)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(norm.astype(jnp.float32))) for norm in norms))
        other = metrics.other_metrics or {}
        scalars = {
            "loss": metrics.loss,
            "kl_loss": other["kl_loss"],
            "ce_loss": other["ce_loss"],
            "learning_rate": schedule(state.step),
            "grad_norm": grad_norm,
        }
        if "hidden_state_loss" in other:
            scalars["hidden_state_loss"] = other["hidden_state_loss"]
        return new_state, scalars

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, partition_spec)
    return jax.jit(
        train_step,
        in_shardings=(student_state.shardings, batch_sharding, teacher_state.shardings),
        out_shardings=(student_state.shardings, replicated),
        donate_argnums=(0,),
    )


def build_nll_fn(mesh):
    """Return `nll(module_state, input_ids, attention_mask, labels) -> (sum of NLL, token count)`."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    def nll(state, input_ids, attention_mask, labels):
        module = state.model
        logits = module(input_ids=input_ids, attention_mask=attention_mask).logits.astype(jnp.float32)
        mask = (attention_mask * (labels != -100)).astype(jnp.float32)
        safe = jnp.where(labels == -100, 0, labels)
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
        return jnp.sum(per_token * mask), jnp.sum(mask)

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(nll, out_shardings=(replicated, replicated))


def global_batch(mesh, local: dict[str, Any], global_rows: int) -> dict[str, Any]:
    """Assemble the global, sharded batch from this process's rows."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec(*BATCH_AXES))
    arrays = {}
    for key, value in local.items():
        shape = (global_rows, *value.shape[1:])
        arrays[key] = jax.make_array_from_process_local_data(sharding, value, shape)
    return arrays
