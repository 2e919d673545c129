"""FLOPs model of one distillation step, for achieved TFLOP/s and MFU.

Model FLOPs per consumed token count only matrix multiplications (a multiply-add is
2 FLOPs). Norms, activations, softmax and the loss are elementwise, so they are left out:

* one decoder layer, forward:
  - attention projections: 2 * hidden * (heads + 2 * kv_heads + heads) * head_dim
    (query, key, value, output),
  - attention itself: 2 * 2 * heads * head_dim * sequence_length (scores Q.K^T, then the
    weighted sum of V), counted over the full sequence as in the PaLM paper's MFU
    definition (Chowdhery et al. 2022, appendix B) although causal masking makes half
    of the score matrix unused,
  - SwiGLU MLP: 2 * 3 * hidden * intermediate (gate, up and down projections);
* output projection (lm_head): 2 * hidden * vocab; the embedding lookup is free;
* backward pass: twice the forward FLOPs.

A step runs the teacher forward only (it is frozen) and the student forward and backward,
so training FLOPs per token = teacher forward + 3 * student forward.

These are model FLOPs: recomputation (gradient checkpointing, the chunked logits path
that recomputes the vocabulary projection) does not count, as MFU is defined.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from distill.config import StudentConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a Llama/Qwen-style decoder that determine its FLOPs."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelShape.{name}={value!r} is invalid; it must be a positive integer")

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """Read the shape from a Hugging Face `config.json` mapping (Llama, Qwen2/3, Mistral).

        `head_dim` defaults to hidden_size / num_attention_heads and `num_key_value_heads`
        to num_attention_heads, as in transformers.
        """
        missing = [
            key
            for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
            if config.get(key) is None
        ]
        if missing:
            raise ValueError(
                f"the model config has no {', '.join(missing)}; pass a decoder config.json "
                "(Llama, Qwen2 or Qwen3 architecture)"
            )
        heads = int(config["num_attention_heads"])
        head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
        return cls(
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            vocab_size=int(config["vocab_size"]),
        )


def student_shape(student: StudentConfig, vocab_size: int) -> ModelShape:
    """Return the shape of the student described by the experiment config."""
    return ModelShape(
        num_layers=student.num_hidden_layers,
        hidden_size=student.hidden_size,
        intermediate_size=student.intermediate_size,
        num_attention_heads=student.num_attention_heads,
        num_key_value_heads=student.num_key_value_heads,
        head_dim=student.head_dim,
        vocab_size=vocab_size,
    )


def forward_flops_per_token(shape: ModelShape, sequence_length: int) -> float:
    """Return the forward-pass FLOPs per token of one model at `sequence_length` tokens."""
    if sequence_length <= 0:
        raise ValueError(f"sequence_length={sequence_length} is invalid; it must be a positive number of tokens")

    projection_width = (2 * shape.num_attention_heads + 2 * shape.num_key_value_heads) * shape.head_dim
    attention_projections = 2 * shape.hidden_size * projection_width
    attention_scores = 2 * 2 * shape.num_attention_heads * shape.head_dim * sequence_length
    mlp = 2 * 3 * shape.hidden_size * shape.intermediate_size
    per_layer = attention_projections + attention_scores + mlp

    output_projection = 2 * shape.hidden_size * shape.vocab_size
    return float(shape.num_layers * per_layer + output_projection)


def training_flops_per_token(teacher: ModelShape, student: ModelShape, sequence_length: int) -> float:
    """Return the model FLOPs of one distillation step per consumed token.

    The teacher runs forward only; the student runs forward and backward (3x forward).
    """
    teacher_forward = forward_flops_per_token(teacher, sequence_length)
    student_forward = forward_flops_per_token(student, sequence_length)
    return teacher_forward + 3.0 * student_forward


def peak_flops_per_chip(tpu_type: str | None) -> float | None:
    """Return the dense bf16 peak of one chip in FLOP/s, or None when it is not known (CPU).

    The peak comes from the TPU topology table; an unknown TPU type raises
    distill.topology.UnknownTpuTypeError naming the valid types.
    """
    if not tpu_type:
        return None

    from distill.topology import lookup

    return lookup(tpu_type).peak_bf16_tflops_per_chip * 1e12
