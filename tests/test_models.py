"""Teacher loading: padded-vocabulary truncation, the real mismatch error, and the fidelity check."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

os.environ["ENABLE_DISTRIBUTED_INIT"] = "0"

from distill.config import FidelityCheckConfig, TeacherConfig  # noqa: E402
from distill.exitcodes import InvalidInputError  # noqa: E402
from distill.models import check_vocabulary, teacher_config_overrides  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def padded_teacher(tmp_path_factory):
    """A tiny random Llama checkpoint whose embedding has 400 rows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rope_theta=50000.0,
    )
    folder = tmp_path_factory.mktemp("padded-teacher")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_overrides_read_rope_parameters():
    overrides = teacher_config_overrides({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "rms_norm_eps": 1e-5})
    assert overrides["rope_theta"] == 100000.0
    assert overrides["rms_norm_eps"] == 1e-5
    assert "rope_scaling" not in overrides


def test_overrides_keep_rope_scaling():
    overrides = teacher_config_overrides(
        {"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}}
    )
    assert overrides["rope_theta"] == 1e6
    assert overrides["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0}


def test_qwen3_padding_accepted():
    assert check_vocabulary(151_936, 151_669) is True
    assert check_vocabulary(49_152, 49_152) is False


def test_padded_teacher_logits_truncated(padded_teacher, caplog):
    from distill.fidelity import easydel_logits
    from distill.models import load_teacher

    teacher_config = TeacherConfig(path=str(padded_teacher), dtype="float32")
    input_ids = np.array([[1, 5, 9, 389, 2, 7, 11, 3]], dtype=np.int32)
    full = load_teacher(teacher_config, tokenizer_size=400, tensor_parallel_size=1)
    full_logits = easydel_logits(full.module, input_ids)

    with caplog.at_level(logging.INFO, logger="distill.models"):
        truncated = load_teacher(teacher_config, tokenizer_size=390, tensor_parallel_size=1)
    logits = easydel_logits(truncated.module, input_ids)

    assert truncated.truncated_from == 400
    assert truncated.module.config.vocab_size == 390
    assert logits.shape == (1, 8, 390)
    np.testing.assert_allclose(logits, full_logits[..., :390], rtol=1e-5, atol=1e-5)
    assert "truncating the teacher's logits to the tokenizer's 390 tokens" in caplog.text


def test_vocabulary_mismatch_names_sizes(padded_teacher):
    from distill.models import load_teacher

    teacher_config = TeacherConfig(path=str(padded_teacher), dtype="float32")
    with pytest.raises(InvalidInputError) as larger:
        load_teacher(teacher_config, tokenizer_size=401, tensor_parallel_size=1)
    assert "400 rows" in str(larger.value)
    assert "401 tokens" in str(larger.value)
    with pytest.raises(InvalidInputError) as smaller:
        load_teacher(teacher_config, tokenizer_size=100, tensor_parallel_size=1)
    assert "400 rows" in str(smaller.value)
    assert "100 tokens" in str(smaller.value)


@pytest.fixture(scope="module")
def real_blocks(assets):
    from transformers import AutoTokenizer

    from distill.config import DataConfig
    from distill.data import fixed_blocks

    tokenizer = AutoTokenizer.from_pretrained(assets / "smollm2-135m")
    data = DataConfig.model_validate(
        {"sources": [{"type": "jsonl", "path": str(assets / "kjv" / "train.jsonl")}], "sequence_length": 128}
    )
    return fixed_blocks(data, data.sources, tokenizer, 4)


def test_fidelity_passes_for_real_teacher(assets, real_blocks):
    from distill.fidelity import check_teacher_fidelity
    from distill.models import load_teacher

    folder = str(assets / "smollm2-135m")
    teacher = load_teacher(TeacherConfig(path=folder, dtype="float32"), tokenizer_size=49152, tensor_parallel_size=1)
    report = check_teacher_fidelity(FidelityCheckConfig(), teacher.module, folder, real_blocks, 49152)
    assert report.top1_agreement >= 0.97
    assert report.max_logit_diff < 2.0
    assert abs(report.easydel_perplexity - report.reference_perplexity) / report.reference_perplexity < 0.01


def test_fidelity_fails_for_wrong_rope_base(assets, real_blocks):
    from distill.fidelity import check_teacher_fidelity
    from distill.models import load_teacher

    folder = str(assets / "smollm2-135m")
    teacher = load_teacher(
        TeacherConfig(path=folder, dtype="float32"),
        tokenizer_size=49152,
        tensor_parallel_size=1,
        extra_overrides={"rope_theta": 10000.0},
    )
    with pytest.raises(InvalidInputError) as caught:
        check_teacher_fidelity(FidelityCheckConfig(), teacher.module, folder, real_blocks, 49152)
    message = str(caught.value)
    assert "teacher fidelity check failed" in message
    assert "top-1 agreement" in message
    assert "largest logit difference" in message
