"""The FLOPs model behind achieved TFLOP/s and MFU, checked against real transformers models."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from distill.config import StudentConfig
from distill.flops import (
    ModelShape,
    forward_flops_per_token,
    peak_flops_per_chip,
    student_shape,
    training_flops_per_token,
)
from distill.topology import UnknownTpuTypeError, load_topology_table

TEACHER = ModelShape(
    num_layers=4, hidden_size=96, intermediate_size=256, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
    vocab_size=500,
)
STUDENT = ModelShape(
    num_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    vocab_size=500,
)


def matmul_weights(model: torch.nn.Module) -> int:
    """Count weights that a token multiplies: every Linear layer, lm_head included, once each."""
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))


def qwen3(shape: ModelShape) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return Qwen3ForCausalLM(config)


def attention_flops(shape: ModelShape, sequence_length: int) -> float:
    return 4.0 * shape.num_layers * shape.num_attention_heads * shape.head_dim * sequence_length


@pytest.mark.parametrize("shape", [TEACHER, STUDENT], ids=["teacher", "student"])
def test_forward_matches_qwen3_weights(shape):
    # Without the attention term, forward FLOPs are 2 per weight of every matrix multiply.
    model = qwen3(shape)
    dense = forward_flops_per_token(shape, 128) - attention_flops(shape, 128)
    assert dense == 2 * matmul_weights(model)


def test_attention_term_linear_in_length():
    difference = forward_flops_per_token(STUDENT, 2048) - forward_flops_per_token(STUDENT, 1024)
    assert difference == attention_flops(STUDENT, 1024)


def test_training_is_teacher_plus_three_students():
    expected = forward_flops_per_token(TEACHER, 256) + 3 * forward_flops_per_token(STUDENT, 256)
    assert training_flops_per_token(TEACHER, STUDENT, 256) == expected


def test_shape_from_llama_config():
    config = LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )
    shape = ModelShape.from_hf_config(config.to_dict())
    assert shape == ModelShape(2, 64, 128, 4, 2, 16, 320)


def test_shape_defaults_head_dim_and_kv_heads():
    shape = ModelShape.from_hf_config(
        {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8, "vocab_size": 10}
    )
    assert shape.head_dim == 8
    assert shape.num_key_value_heads == 8


def test_shape_missing_field_named():
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelShape.from_hf_config({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "vocab_size": 10})


def test_shape_rejects_zero():
    with pytest.raises(ValueError, match="hidden_size=0"):
        ModelShape(2, 0, 128, 4, 2, 16, 320)


def test_sequence_length_rejects_zero():
    with pytest.raises(ValueError, match="sequence_length=0"):
        forward_flops_per_token(STUDENT, 0)


def test_peak_from_topology_table():
    table = load_topology_table()
    assert peak_flops_per_chip("v4-64") == table["v4-64"].peak_bf16_tflops_per_chip * 1e12
    assert peak_flops_per_chip("v6e-256") == table["v6e-256"].peak_bf16_tflops_per_chip * 1e12


def test_peak_unknown_on_cpu():
    assert peak_flops_per_chip("") is None
    assert peak_flops_per_chip(None) is None


def test_peak_unknown_tpu_type_raises():
    with pytest.raises(UnknownTpuTypeError, match="v9-8"):
        peak_flops_per_chip("v9-8")


def test_student_shape_from_config():
    student = StudentConfig(
        num_hidden_layers=4, hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64,
    )
    assert student_shape(student, 49152) == ModelShape(4, 256, 768, 4, 2, 64, 49152)
