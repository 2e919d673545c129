"""Tokenizer, frozen teacher and fresh student, built with EasyDeL on one device mesh.

Both models use the same EasyDeL sharding axes (dp, fsdp, ep, tp, sp) = (1, -1, 1, tp, 1), so
the parameters are sharded FSDP-style over every device of every process, with optional tensor
parallelism, and the jitted distillation step runs on a single mesh.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.config import Config, StudentConfig, TeacherConfig
from distill.exitcodes import InvalidInputError

logger = logging.getLogger(__name__)

# A teacher embedding matrix may have more rows than the tokenizer has tokens: checkpoints pad
# the vocabulary to a hardware-friendly multiple (Qwen3: 151,936 rows for 151,669 tokens, 267
# extra). Rows past the tokenizer are never produced as input and are dropped from the output.
# More extra rows than both limits below means the tokenizer belongs to another model.
MAX_VOCAB_PADDING_ROWS = 256
MAX_VOCAB_PADDING_FRACTION = 0.01

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def jnp_dtype(name: str):
    import jax.numpy as jnp

    return getattr(jnp, _DTYPES[name])


def sharding_axis_dims(tensor_parallel_size: int) -> tuple[int, ...]:
    return (1, -1, 1, tensor_parallel_size, 1)


def resolve_path(path: str) -> str:
    """Return a local folder for `path`, downloading gs:// folders into the local cache first."""
    if not path.startswith("gs://"):
        return path
    import os

    import fsspec

    cache_root = Path(os.environ.get("DISTILL_CACHE_DIR", Path.home() / ".cache" / "distill")) / "models"
    local = cache_root / path.removeprefix("gs://").replace("/", "__")
    marker = local / ".complete"
    if marker.is_file():
        logger.info("using cached copy of %s in %s", path, local)
        return str(local)
    logger.info("downloading %s to %s", path, local)
    filesystem, root = fsspec.core.url_to_fs(path)
    filesystem.get(root.rstrip("/") + "/", str(local), recursive=True)
    marker.write_text("ok\n")
    return str(local)


def load_tokenizer(config: Config):
    from transformers import AutoTokenizer

    source = config.tokenizer.path or config.teacher.path
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(source), revision=config.teacher.revision)
    logger.info("tokenizer loaded from %s: %d tokens, EOS id %s", source, len(tokenizer), tokenizer.eos_token_id)
    return tokenizer


def read_hf_config(folder: str) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise InvalidInputError(
            f"teacher folder {folder} has no config.json; teacher.path must be an HF-format model folder or hub id"
        )
    return json.loads(path.read_text())


def teacher_config_overrides(hf_config: dict[str, Any]) -> dict[str, Any]:
    """Collect the checkpoint's architecture fields that EasyDeL's conversion must not drop.

    transformers 5 stores the rotary base under `rope_parameters`; EasyDeL 0.3.0's configs only
    read a top-level `rope_theta` and otherwise fall back to 10,000, which silently changes the
    model (for SmolLM2-135M: perplexity 54 instead of 48). Every field is passed explicitly.
    """
    overrides: dict[str, Any] = {}
    rope = hf_config.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta"))
    if rope_theta is not None:
        overrides["rope_theta"] = float(rope_theta)
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        overrides["rope_scaling"] = {key: value for key, value in rope.items() if key != "rope_theta"}
    elif hf_config.get("rope_scaling"):
        overrides["rope_scaling"] = hf_config["rope_scaling"]
    for key in (
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "head_dim",
        "attention_bias",
        "mlp_bias",
        "sliding_window",
        "use_sliding_window",
        "hidden_act",
    ):
        if key in hf_config and hf_config[key] is not None:
            overrides[key] = hf_config[key]
    return overrides


def check_vocabulary(teacher_rows: int, tokenizer_size: int) -> bool:
    """Return True when the teacher's vocabulary must be truncated; raise on a real mismatch."""
    if teacher_rows == tokenizer_size:
        return False
    padding = teacher_rows - tokenizer_size
    if 0 < padding <= max(MAX_VOCAB_PADDING_ROWS, MAX_VOCAB_PADDING_FRACTION * tokenizer_size):
        return True
    raise InvalidInputError(
        f"vocabulary mismatch: the teacher's embedding has {teacher_rows} rows but the tokenizer has "
        f"{tokenizer_size} tokens; the student must share the teacher's tokenizer, so set tokenizer.path "
        f"to the teacher's own tokenizer (or leave it empty)"
    )


def truncate_vocabulary(model, size: int) -> None:
    """Drop the padded rows of the input embedding and output projection in place.

    Removing output rows equals slicing the logits to the tokenizer's size, and since token ids
    stay below `size`, the embedding lookup is unchanged.
    """
    embedding = model.get_embedding().embedding
    embedding.value = embedding.value[:size]
    head = model.get_lm_head()
    kernel = getattr(head, "kernel", None)
    if kernel is not None and kernel.value is not None and kernel.value.shape[-1] > size:
        kernel.value = kernel.value[..., :size]
    bias = getattr(head, "bias", None)
    if bias is not None and getattr(bias, "value", None) is not None and bias.value.shape[-1] > size:
        bias.value = bias.value[:size]
    model.config.vocab_size = size


@dataclass
class TeacherModel:
    module: Any
    hf_config: dict[str, Any]
    folder: str
    truncated_from: int | None


def load_teacher(
    teacher: TeacherConfig,
    tokenizer_size: int,
    tensor_parallel_size: int,
    extra_overrides: dict[str, Any] | None = None,
) -> TeacherModel:
    """Load the frozen teacher from an HF-format folder, hub id or gs:// folder into EasyDeL.

    `extra_overrides` replaces config fields after the checkpoint's own; tests use it to prove
    that the fidelity check catches a wrong field.
    """
    import easydel as ed

    folder = resolve_path(teacher.path)
    local = Path(folder).is_dir()
    hf_config = read_hf_config(folder) if local else _hub_config(folder, teacher.revision)
    overrides = teacher_config_overrides(hf_config)
    overrides.update(extra_overrides or {})
    teacher_rows = int(hf_config.get("vocab_size", 0))
    truncate = check_vocabulary(teacher_rows, tokenizer_size)

    logger.info("loading teacher %s (%s) with explicit fields %s", teacher.path, hf_config.get("model_type"), overrides)
    dtype = jnp_dtype(teacher.dtype)
    module = ed.AutoEasyDeLModelForCausalLM.from_pretrained(
        folder,
        dtype=dtype,
        param_dtype=dtype,
        sharding_axis_dims=sharding_axis_dims(tensor_parallel_size),
        config_kwargs=overrides,
        auto_shard_model=True,
        verbose=False,
        revision=teacher.revision,
    )
    for key, expected in overrides.items():
        actual = getattr(module.config, key, None)
        if actual is not None and actual != expected:
            raise InvalidInputError(
                f"EasyDeL's teacher config has {key}={actual!r} but the checkpoint's config.json has {expected!r}; "
                f"this EasyDeL version does not honour the field"
            )
    if truncate:
        logger.info(
            "teacher vocabulary is padded: %d embedding rows for %d tokenizer tokens; truncating the teacher's "
            "logits to the tokenizer's %d tokens",
            teacher_rows, tokenizer_size, tokenizer_size,
        )
        truncate_vocabulary(module, tokenizer_size)
    return TeacherModel(module=module, hf_config=hf_config, folder=folder, truncated_from=teacher_rows if truncate else None)


def _hub_config(repo_id: str, revision: str | None) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision)
    except Exception as error:  # noqa: BLE001 - the hub client raises many types; all mean "cannot read it"
        raise InvalidInputError(
            f"teacher.path {repo_id!r} is neither a local folder nor a readable hub model ({error}); "
            f"check the id, the revision and the HF_TOKEN secret"
        ) from error
    return json.loads(Path(path).read_text())


def build_student(student: StudentConfig, vocab_size: int, tensor_parallel_size: int, seed: int):
    """Create a randomly initialised Qwen3 student, sharded over the mesh."""
    import easydel as ed
    from flax import nnx

    qwen3_config = ed.Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=student.hidden_size,
        intermediate_size=student.intermediate_size,
        num_hidden_layers=student.num_hidden_layers,
        num_attention_heads=student.num_attention_heads,
        num_key_value_heads=student.num_key_value_heads,
        head_dim=student.head_dim,
        rope_theta=student.rope_theta,
        rms_norm_eps=student.rms_norm_eps,
        tie_word_embeddings=student.tie_word_embeddings,
        max_position_embeddings=student.max_position_embeddings,
        sharding_axis_dims=sharding_axis_dims(tensor_parallel_size),
    )
    module = ed.Qwen3ForCausalLM(
        config=qwen3_config,
        dtype=jnp_dtype(student.dtype),
        param_dtype=jnp_dtype(student.param_dtype),
        precision=None,
        rngs=nnx.Rngs(seed),
    )
    return module.shard_model()


def count_parameters(module) -> int:
    import jax
    from flax import nnx

    state = nnx.state(module, nnx.Param)
    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(state)))
