"""Text streams: packing, label shift, padding, mixtures, resumable positions and input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill.config import DataConfig
from distill.data import (
    IGNORE_INDEX,
    StreamPosition,
    TextStream,
    batches,
    local_rows,
    pack_tokens,
    pad_document,
)
from distill.exitcodes import InvalidInputError


class WordTokenizer:
    """A tokenizer whose ids are readable by hand: each word is its integer value, EOS is 0."""

    eos_token_id = 0
    pad_token_id = 99

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(word) for word in text.split()]}


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: text}) + "\n" for text in texts))
    return path


def data_config(*sources, **extra) -> DataConfig:
    return DataConfig.model_validate({"sources": list(sources), "sequence_length": 4, **extra})


def test_pack_shifts_labels_to_next_token():
    blocks, rest = pack_tokens([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 4)
    assert [block["input_ids"].tolist() for block in blocks] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert [block["labels"].tolist() for block in blocks] == [[2, 3, 4, 5], [6, 7, 8, 9]]
    assert all(block["attention_mask"].tolist() == [1, 1, 1, 1] for block in blocks)
    assert rest == [9, 10]


def test_pack_keeps_partial_block():
    blocks, rest = pack_tokens([1, 2, 3, 4], 4)
    assert blocks == []
    assert rest == [1, 2, 3, 4]


def test_pad_document_masks_padding():
    block = pad_document([7, 8, 9], 5, pad_id=99)
    assert block["input_ids"].tolist() == [7, 8, 9, 99, 99]
    assert block["attention_mask"].tolist() == [1, 1, 1, 0, 0]
    assert block["labels"].tolist() == [8, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


def test_pad_document_truncates_with_real_last_label():
    block = pad_document([1, 2, 3, 4, 5, 6, 7], 4, pad_id=99)
    assert block["input_ids"].tolist() == [1, 2, 3, 4]
    assert block["labels"].tolist() == [2, 3, 4, 5]


def test_stream_packs_documents_with_eos(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", ["1 2 3", "4 5", "6 7 8 9"])
    config = data_config({"type": "jsonl", "path": str(source)})
    stream = TextStream(config, WordTokenizer(), seed=0)
    blocks = stream.blocks()
    first, second = next(blocks), next(blocks)
    assert first["input_ids"].tolist() == [1, 2, 3, 0]
    assert first["labels"].tolist() == [2, 3, 0, 4]
    assert second["input_ids"].tolist() == [4, 5, 0, 6]
    assert second["labels"].tolist() == [5, 0, 6, 7]


def test_stream_without_packing_pads(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", ["1 2", "3 4 5 6 7"])
    config = data_config({"type": "jsonl", "path": str(source)}, packing=False)
    blocks = TextStream(config, WordTokenizer(), seed=0).blocks()
    first = next(blocks)
    assert first["input_ids"].tolist() == [1, 2, 0, 99]
    assert first["attention_mask"].tolist() == [1, 1, 1, 0]
    assert first["labels"].tolist() == [2, 0, IGNORE_INDEX, IGNORE_INDEX]


def test_stream_restarts_source_after_last_record(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", ["1 2 3"])
    config = data_config({"type": "jsonl", "path": str(source)})
    stream = TextStream(config, WordTokenizer(), seed=0)
    blocks = stream.blocks()
    tokens = [next(blocks)["input_ids"].tolist() for _ in range(3)]
    assert tokens == [[1, 2, 3, 0], [1, 2, 3, 0], [1, 2, 3, 0]]
    assert stream.position.passes == [3]


def test_text_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("1 2 3\n4 5 6\n")
    pq.write_table(pa.table({"body": ["7 8 9", "10 11 12"]}), tmp_path / "b.parquet")
    text = TextStream(data_config({"type": "text", "path": str(tmp_path / "a.txt")}), WordTokenizer(), seed=0)
    assert next(text.blocks())["input_ids"].tolist() == [1, 2, 3, 0]
    parquet = TextStream(
        data_config({"type": "parquet", "path": str(tmp_path / "b.parquet"), "content_field": "body"}), WordTokenizer(), seed=0
    )
    assert next(parquet.blocks())["input_ids"].tolist() == [7, 8, 9, 0]


def test_mixture_is_deterministic_and_weighted(tmp_path):
    left = write_jsonl(tmp_path / "left.jsonl", ["1"] * 50)
    right = write_jsonl(tmp_path / "right.jsonl", ["2"] * 50)
    config = data_config(
        {"type": "jsonl", "path": str(left), "weight": 3.0}, {"type": "jsonl", "path": str(right), "weight": 1.0}
    )

    def first_tokens(seed):
        blocks = TextStream(config, WordTokenizer(), seed=seed).blocks()
        return [token for _ in range(100) for token in next(blocks)["input_ids"].tolist() if token != 0]

    run_a, run_b, other_seed = first_tokens(1), first_tokens(1), first_tokens(2)
    assert run_a == run_b
    assert run_a != other_seed
    share_left = run_a.count(1) / len(run_a)
    assert 0.65 < share_left < 0.85


def test_position_restores_exact_stream(tmp_path):
    # Left documents span several blocks, so batch boundaries fall inside a document.
    left = write_jsonl(tmp_path / "left.jsonl", [" ".join(str(i + k) for k in range(13)) for i in range(1, 40)])
    right = write_jsonl(tmp_path / "right.jsonl", [f"{i}" for i in range(100, 140)])
    config = data_config({"type": "jsonl", "path": str(left)}, {"type": "jsonl", "path": str(right)})
    uninterrupted = batches(TextStream(config, WordTokenizer(), seed=3), 3)
    expected = [next(uninterrupted)[0] for _ in range(6)]

    first = batches(TextStream(config, WordTokenizer(), seed=3), 3)
    for _ in range(3):
        _batch, position = next(first)
    saved = json.loads(json.dumps(position.to_json()))
    resumed = batches(TextStream(config, WordTokenizer(), seed=3, position=StreamPosition.from_json(saved)), 3)
    for index in range(3, 6):
        batch, _ = next(resumed)
        assert batch["input_ids"].tolist() == expected[index]["input_ids"].tolist()


def test_local_rows_split_global_batch():
    batch = {"input_ids": np.arange(8).reshape(4, 2)}
    shares = [local_rows(batch, index, 2)["input_ids"].tolist() for index in range(2)]
    assert shares == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


def test_missing_content_field_names_fields(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", ["1 2"], field="content")
    config = data_config({"type": "jsonl", "path": str(source), "content_field": "text"})
    with pytest.raises(InvalidInputError) as caught:
        TextStream(config, WordTokenizer(), seed=0)
    assert "no field 'text'" in str(caught.value)
    assert "['content']" in str(caught.value)


def test_empty_source_rejected(tmp_path):
    source = tmp_path / "empty.jsonl"
    source.write_text("")
    config = data_config({"name": "empty-one", "type": "jsonl", "path": str(source)})
    with pytest.raises(InvalidInputError) as caught:
        TextStream(config, WordTokenizer(), seed=0)
    assert "'empty-one'" in str(caught.value)
    assert "no records" in str(caught.value)


def test_missing_file_rejected(tmp_path):
    config = data_config({"type": "jsonl", "path": str(tmp_path / "absent.jsonl")})
    with pytest.raises(InvalidInputError) as caught:
        TextStream(config, WordTokenizer(), seed=0)
    assert "no file matches" in str(caught.value)
