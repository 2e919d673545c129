"""Text streams: read sources, mix them by weight, tokenize, pack and shift labels.

All source types go through `datasets.load_dataset` as an `IterableDataset` (map-style sets are
converted with `to_iterable_dataset`), so local jsonl/parquet/text files, gs:// files and hub
datasets share one code path, and `state_dict()` gives a resumable position for each source.

Each training example has `input_ids`, `attention_mask` and `labels`, where `labels[i]` is the
token that follows `input_ids[i]` (EasyDeL's loss does not shift labels itself) and -100 marks
positions without a next token. With packing, documents are joined with the EOS token and cut
into full blocks; attention crosses document boundaries, as in common pre-training setups.
"""

from __future__ import annotations

import copy
import glob
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distill.config import DataConfig, SourceConfig
from distill.exitcodes import InvalidInputError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

_BUILDERS = {"jsonl": "json", "parquet": "parquet", "text": "text"}


def _data_files(source: SourceConfig) -> list[str]:
    patterns = source.files if source.files is not None else [source.path]
    files: list[str] = []
    for pattern in patterns:
        if "://" in pattern:
            files.append(pattern)
            continue
        # A plain folder means every file in it.
        if not glob.has_magic(pattern) and os.path.isdir(pattern):
            pattern = pattern.rstrip("/") + "/*"
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise InvalidInputError(
                f"data source {source.label!r}: no file matches {pattern!r}; check the path (relative paths start "
                f"at the working directory) or run `distill assets` for the demo corpus"
            )
        files.extend(matches)
    return files


def open_source(source: SourceConfig, streaming: bool):
    """Open one source as a `datasets.IterableDataset` of records."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if source.type == "hub":
            dataset = datasets.load_dataset(source.path, name=source.subset, split=source.split, streaming=streaming)
        else:
            dataset = datasets.load_dataset(
                _BUILDERS[source.type], data_files={source.split: _data_files(source)}, split=source.split,
                streaming=streaming,
            )
    except (StopIteration, datasets.data_files.EmptyDatasetError):
        # datasets raises a bare StopIteration when a json file has no rows.
        raise InvalidInputError(
            f"data source {source.label!r} has no records in split {source.split!r}; point it at non-empty data"
        ) from None
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise InvalidInputError(f"data source {source.label!r} could not be opened: {error}") from error
    if not streaming:
        dataset = dataset.to_iterable_dataset()
    return dataset


def content_field(source: SourceConfig) -> str:
    # The `text` builder always names its single column "text".
    return "text" if source.type == "text" else source.content_field


def check_source(source: SourceConfig, dataset) -> None:
    """Fail before training when a source is empty or its records lack the content field."""
    first = next(iter(dataset), None)
    if first is None:
        raise InvalidInputError(
            f"data source {source.label!r} has no records in split {source.split!r}; point it at non-empty data"
        )
    name = content_field(source)
    if name not in first:
        raise InvalidInputError(
            f"data source {source.label!r}: records have no field {name!r}; the fields are "
            f"{sorted(first)}; set content_field to one of them"
        )
    if not isinstance(first[name], str):
        raise InvalidInputError(
            f"data source {source.label!r}: field {name!r} contains {type(first[name]).__name__}, not text; "
            f"set content_field to a text field"
        )


@dataclass
class StreamPosition:
    """Position of a mixed stream, with enough state to continue it exactly after a restart."""

    sources: list[dict[str, Any]] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)
    rng_state: dict[str, Any] | None = None
    carry: list[int] = field(default_factory=list)
    blocks: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": self.sources,
            "passes": self.passes,
            "rng_state": self.rng_state,
            "carry": self.carry,
            "blocks": self.blocks,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamPosition:
        return cls(**data)


def pack_tokens(buffer: list[int], sequence_length: int) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """Cut full blocks from a token buffer; return the blocks and the tokens left over.

    A block needs sequence_length + 1 tokens because its last label is the next block's first
    token. Consecutive blocks therefore share one token, and no position loses its label.
    """
    blocks = []
    start = 0
    while len(buffer) - start >= sequence_length + 1:
        window = np.asarray(buffer[start : start + sequence_length + 1], dtype=np.int32)
        blocks.append(
            {
                "input_ids": window[:-1],
                "attention_mask": np.ones(sequence_length, dtype=np.int32),
                "labels": window[1:],
            }
        )
        start += sequence_length
    return blocks, buffer[start:]


def pad_document(tokens: list[int], sequence_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Truncate or pad one document to a block; padding gets mask 0 and label -100."""
    tokens = tokens[: sequence_length + 1]
    length = min(len(tokens), sequence_length)
    input_ids = np.full(sequence_length, pad_id, dtype=np.int32)
    attention_mask = np.zeros(sequence_length, dtype=np.int32)
    labels = np.full(sequence_length, IGNORE_INDEX, dtype=np.int32)
    input_ids[:length] = tokens[:length]
    attention_mask[:length] = 1
    next_tokens = tokens[1 : length + 1]
    labels[: len(next_tokens)] = next_tokens
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class TextStream:
    """An endless, deterministic stream of training blocks from a weighted mixture of sources."""

    def __init__(self, config: DataConfig, tokenizer, seed: int, position: StreamPosition | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.seed = seed
        self.weights = np.asarray([source.weight for source in config.sources], dtype=np.float64)
        self.weights /= self.weights.sum()
        if tokenizer.eos_token_id is None:
            raise InvalidInputError("the tokenizer has no EOS token, which packing needs to separate documents")
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id

        self.datasets = []
        self._start_states = []
        for source in config.sources:
            dataset = open_source(source, config.streaming)
            if config.shuffle_buffer > 0:
                dataset = dataset.shuffle(seed=seed, buffer_size=config.shuffle_buffer)
            self._start_states.append(copy.deepcopy(dataset.state_dict()))
            check_source(source, dataset)
            self.datasets.append(dataset)

        self.position = position or StreamPosition(
            sources=copy.deepcopy(self._start_states), passes=[0] * len(self.datasets)
        )
        if len(self.position.sources) != len(self.datasets):
            raise InvalidInputError(
                f"the saved data position has {len(self.position.sources)} sources but the config has "
                f"{len(self.datasets)}; resume with the same data.sources or start a new save_directory"
            )
        self.rng = np.random.default_rng(seed)
        if self.position.rng_state is not None:
            self.rng.bit_generator.state = self.position.rng_state
        self._iterators: list[Iterator | None] = [None] * len(self.datasets)
        for index, state in enumerate(self.position.sources):
            self.datasets[index].load_state_dict(state)

    def _next_text(self, index: int) -> str:
        """Return the next record's text of source `index`, starting a new pass at its end."""
        for _attempt in range(2):
            if self._iterators[index] is None:
                self._iterators[index] = iter(self.datasets[index])
            record = next(self._iterators[index], None)
            if record is not None:
                return record[content_field(self.config.sources[index])]
            self.position.passes[index] += 1
            logger.info(
                "data source %r finished pass %d; starting again from its beginning",
                self.config.sources[index].label, self.position.passes[index],
            )
            self.datasets[index].load_state_dict(copy.deepcopy(self._start_states[index]))
            self._iterators[index] = None
        raise InvalidInputError(f"data source {self.config.sources[index].label!r} yields no records")

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def blocks(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield training blocks forever; `snapshot()` between two blocks gives a resumable position.

        Tokens not yet cut into a block stay in `position.carry` until the moment their block is
        yielded, so a snapshot taken at any batch boundary loses and repeats nothing.
        """
        length = self.config.sequence_length
        while True:
            carry = self.position.carry
            if self.config.packing and len(carry) >= length + 1:
                ready, _rest = pack_tokens(carry[: length + 1], length)
                self.position.carry = carry[length:]
                self.position.blocks += 1
                yield ready[0]
                continue
            index = int(self.rng.choice(len(self.datasets), p=self.weights))
            tokens = self._tokenize(self._next_text(index))
            self.position.sources[index] = self.datasets[index].state_dict()
            if self.config.packing:
                self.position.carry = self.position.carry + tokens
                continue
            self.position.blocks += 1
            yield pad_document(tokens, length, self.pad_id)

    def snapshot(self) -> StreamPosition:
        position = copy.deepcopy(self.position)
        position.rng_state = self.rng.bit_generator.state
        return position


def batches(
    stream: TextStream, batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], StreamPosition]]:
    """Group blocks into global batches; each comes with the stream position right after it."""
    blocks = stream.blocks()
    while True:
        rows = [next(blocks) for _ in range(batch_size)]
        batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
        yield batch, stream.snapshot()


def local_rows(batch: dict[str, np.ndarray], process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """Return this process's disjoint, contiguous share of a global batch."""
    size = next(iter(batch.values())).shape[0]
    share = size // process_count
    start = process_index * share
    return {key: value[start : start + share] for key, value in batch.items()}


def fixed_blocks(config: DataConfig, sources: list[SourceConfig], tokenizer, count: int) -> list[dict[str, np.ndarray]]:
    """Return the first `count` blocks of `sources` (no shuffling), for evaluation and checks."""
    fixed = config.model_copy(update={"sources": sources, "shuffle_buffer": 0})
    stream = TextStream(fixed, tokenizer, seed=0)
    blocks = []
    for block in stream.blocks():
        blocks.append(block)
        if len(blocks) == count:
            break
    return blocks
