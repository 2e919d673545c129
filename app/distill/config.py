"""Experiment config: the typed schema that the CLI reads and the Helm chart renders.

Every model rejects unknown keys (``extra="forbid"``), so a typo fails at load time
with the key's path instead of being ignored. Each field's description states its unit.
Cross-field rules that need no model or data (step counts, save interval) live here too,
so `distill validate` catches them before anything expensive starts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """An experiment config that cannot run; the message names key, value and fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PositiveInt = Annotated[int, Field(gt=0)]
DType = Literal["float32", "bfloat16", "float16"]


class ExperimentConfig(_Strict):
    name: str = Field(
        "distill",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=63,
        description="Experiment name (DNS label): metric label, checkpoint sub-folder and Helm release default.",
    )


class FidelityCheckConfig(_Strict):
    enabled: bool = Field(
        True,
        description="Compare the converted teacher's logits with transformers before training (skip only for teachers too large to load twice).",
    )
    num_sequences: PositiveInt = Field(4, description="Training-data sequences scored by both implementations (count).")
    sequence_length: PositiveInt = Field(
        128, description="Tokens per sample sequence, at most data.sequence_length (tokens)."
    )
    min_top1_agreement: float = Field(
        0.97, ge=0.0, le=1.0, description="Lowest accepted share of positions where both pick the same top-1 token (fraction)."
    )
    max_logit_diff: float = Field(
        2.0, gt=0.0, description="Largest accepted absolute difference of any logit between the two implementations (logits)."
    )


class TeacherConfig(_Strict):
    path: str = Field(
        ..., min_length=1, description="Hugging Face hub id, local HF-format folder, or gs:// folder of the frozen teacher."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `path` is a hub id.")
    dtype: DType = Field("bfloat16", description="Compute dtype of the teacher forward pass.")
    fidelity_check: FidelityCheckConfig = Field(default_factory=FidelityCheckConfig)


class StudentConfig(_Strict):
    num_hidden_layers: PositiveInt = Field(..., description="Transformer blocks (count).")
    hidden_size: PositiveInt = Field(..., description="Residual stream width (features).")
    intermediate_size: PositiveInt = Field(..., description="MLP inner width (features).")
    num_attention_heads: PositiveInt = Field(..., description="Query heads (count).")
    num_key_value_heads: PositiveInt = Field(..., description="Key/value heads for grouped-query attention (count); divides num_attention_heads.")
    head_dim: PositiveInt = Field(..., description="Width of one attention head (features).")
    rope_theta: float = Field(1_000_000.0, gt=0, description="Rotary position embedding base (unitless).")
    rms_norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon (unitless).")
    tie_word_embeddings: bool = Field(True, description="Share the input embedding matrix with the output layer.")
    max_position_embeddings: PositiveInt = Field(4096, description="Maximum sequence length the rotary tables cover (tokens).")
    dtype: DType = Field("bfloat16", description="Compute dtype of the student.")
    param_dtype: DType = Field("float32", description="Storage dtype of the student's trainable parameters.")

    @model_validator(mode="after")
    def _check_heads(self) -> StudentConfig:
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} does not divide num_attention_heads="
                f"{self.num_attention_heads}; choose a divisor such as {_divisors(self.num_attention_heads)}"
            )
        return self


class TokenizerConfig(_Strict):
    path: str | None = Field(
        None, description="Tokenizer location (hub id, folder or gs://); empty means the teacher's own tokenizer."
    )


class SourceConfig(_Strict):
    name: str | None = Field(None, description="Label used in logs; defaults to the path.")
    type: Literal["jsonl", "parquet", "text", "hub"] = Field(..., description="Record format: local/gs:// files or a hub dataset.")
    path: str | None = Field(None, description="Hub dataset id (type hub) or a file, folder or glob (other types).")
    files: list[str] | None = Field(None, description="Explicit file list or globs, instead of `path`.")
    subset: str | None = Field(None, description="Hub dataset configuration name (type hub).")
    split: str = Field("train", description="Dataset split to read.")
    content_field: str = Field("text", min_length=1, description="Record field holding the text (ignored for type text).")
    weight: float = Field(1.0, gt=0, description="Relative sampling weight in the mixture (unitless).")

    @model_validator(mode="after")
    def _check_location(self) -> SourceConfig:
        if (self.path is None) == (self.files is None):
            raise ValueError("set exactly one of `path` or `files`")
        if self.type == "hub" and self.files is not None:
            raise ValueError("a hub source takes `path` (the dataset id), not `files`")
        if self.files is not None and len(self.files) == 0:
            raise ValueError("`files` is empty; list at least one file or use `path`")
        return self

    @property
    def label(self) -> str:
        return self.name or self.path or ",".join(self.files or [])


class DataConfig(_Strict):
    sources: list[SourceConfig] = Field(..., description="Text sources mixed by weight.")
    streaming: bool = Field(True, description="Read records lazily; needs max_training_steps or per_epoch_training_steps.")
    sequence_length: PositiveInt = Field(..., description="Tokens per training sequence (tokens).")
    packing: bool = Field(True, description="Concatenate documents (EOS-separated) into full blocks instead of padding each one.")
    shuffle_buffer: int = Field(0, ge=0, description="Records held for approximate shuffling within each source (count, 0 = off).")

    @field_validator("sources")
    @classmethod
    def _check_sources(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        if len(sources) == 0:
            raise ValueError("the source list is empty; add at least one source (type, path, content_field)")
        return sources


class EvaluationConfig(_Strict):
    sources: list[SourceConfig] = Field(default_factory=list, description="Held-out sources scored at the end of the run.")
    num_sequences: int = Field(64, ge=0, description="Held-out sequences scored for perplexity (count).")
    batch_size: PositiveInt = Field(8, description="Sequences per evaluation batch (count).")
    include_teacher: bool = Field(True, description="Also report the teacher's held-out perplexity.")


class HiddenStateLossConfig(_Strict):
    enabled: bool = Field(
        False, description="Add a mean-squared error between the last hidden states (needs equal hidden sizes)."
    )
    weight: float = Field(0.1, ge=0, description="Weight of the hidden-state loss in the total (unitless).")


class DistillationConfig(_Strict):
    temperature: float = Field(2.0, gt=0, description="Softmax temperature T applied to both logit sets (unitless).")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of T^2 * KL(teacher || student); 1 - alpha weighs the CE term.")
    logits_chunk_size: int | None = Field(
        None, gt=0, description="Compute the vocabulary projection in chunks of this many positions (tokens); empty = whole sequence."
    )
    hidden_state_loss: HiddenStateLossConfig = Field(default_factory=HiddenStateLossConfig)


class TrainingConfig(_Strict):
    total_batch_size: PositiveInt = Field(..., description="Sequences per optimizer step across all hosts (sequences).")
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate.")
    end_learning_rate: float = Field(0.0, ge=0, description="Learning rate at the last step for linear and cosine schedules.")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Learning-rate decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to learning_rate (steps).")
    optimizer: Literal["adamw", "adafactor", "lion"] = Field("adamw", description="Optimizer.")
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay (unitless).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this global L2 norm; empty = no clipping.")
    max_training_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (steps).")
    per_epoch_training_steps: int | None = Field(None, gt=0, description="Optimizer steps that make one epoch of a stream (steps).")
    num_epochs: PositiveInt = Field(1, description="Epochs to run when per_epoch_training_steps sets the length (count).")
    save_directory: str = Field(..., min_length=1, description="Local folder or gs:// prefix for checkpoints.")
    save_interval_steps: int | None = Field(None, gt=0, description="Write a checkpoint every this many steps (steps); empty = only at the end.")
    checkpoints_to_keep: PositiveInt = Field(2, description="Complete checkpoints kept; older ones are deleted after a newer one commits (count).")
    seed: int = Field(0, ge=0, description="Seed for student initialisation and data order.")

    @property
    def total_steps(self) -> int | None:
        if self.max_training_steps is not None:
            return self.max_training_steps
        if self.per_epoch_training_steps is not None:
            return self.per_epoch_training_steps * self.num_epochs
        return None


class MeshConfig(_Strict):
    tensor_parallel_size: PositiveInt = Field(1, description="Devices that split each layer (tensor parallelism); the rest shard by FSDP.")


class RuntimeConfig(_Strict):
    coordinator_address: str | None = Field(
        None, description="host:port of process 0 for CPU multi-process runs; empty = detect from the TPU/JobSet environment."
    )
    num_processes: int | None = Field(None, gt=0, description="Processes in the run when coordinator_address is set (count).")
    process_id: int | None = Field(None, ge=0, description="This process's index when coordinator_address is set.")
    initialization_timeout_seconds: PositiveInt = Field(300, description="How long to wait for all processes to join (seconds).")


class MetricsConfig(_Strict):
    enabled: bool = Field(True, description="Serve Prometheus metrics on /metrics.")
    host: str = Field("0.0.0.0", description="Address the metrics server binds to.")
    port: int = Field(9400, ge=0, le=65535, description="Port of the metrics server (0 = pick a free port).")
    final_scrape_timeout_seconds: float = Field(
        0.0,
        ge=0,
        description="After the last step, wait up to this long for one more scrape so Prometheus records the "
        "final values (seconds, 0 = do not wait; set it above the scrape interval when scraped).",
    )


class LoggingConfig(_Strict):
    interval_steps: PositiveInt = Field(10, description="Print one progress line every this many steps (steps).")
    format: Literal["text", "json"] = Field("text", description="Log line format; json has Cloud Logging's severity and message fields.")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Lowest level printed.")


class Config(_Strict):
    """One experiment: teacher, student, data, loss, optimisation, runtime and observability."""

    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    teacher: TeacherConfig
    student: StudentConfig
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    distillation: DistillationConfig = Field(default_factory=DistillationConfig)
    training: TrainingConfig
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _check_run_length(self) -> Config:
        training = self.training
        if self.data.streaming and training.total_steps is None:
            raise ValueError(
                "data.streaming is true but neither training.max_training_steps nor "
                "training.per_epoch_training_steps is set; a stream never ends, so set one of them"
            )
        total = training.total_steps
        interval = training.save_interval_steps
        if total is not None and interval is not None and interval > total:
            raise ValueError(
                f"training.save_interval_steps={interval} is larger than the run ({total} steps), so no "
                f"checkpoint would be written before the end; set it to at most {total} or leave it empty"
            )
        runtime = self.runtime
        if runtime.coordinator_address is not None:
            if runtime.num_processes is None or runtime.process_id is None:
                raise ValueError("runtime.coordinator_address is set; also set runtime.num_processes and runtime.process_id")
            if runtime.process_id >= runtime.num_processes:
                raise ValueError(
                    f"runtime.process_id={runtime.process_id} must be below runtime.num_processes={runtime.num_processes}"
                )
        return self


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _format_location(location: tuple[Any, ...]) -> str:
    parts = []
    for item in location:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _lookup(data: Any, location: tuple[Any, ...]) -> Any:
    for item in location:
        try:
            data = data[item]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _allowed_keys(location: tuple[Any, ...]) -> list[str]:
    """Return the field names valid at the parent of `location`, for typo hints."""
    model: Any = Config
    for item in location[:-1]:
        if isinstance(item, int):
            continue
        field = model.model_fields.get(item)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return sorted(model.model_fields)


def describe_validation_error(error: ValidationError, raw: Any) -> str:
    """Turn a pydantic error into one line per problem: key path, bad value and fix."""
    lines = []
    for item in error.errors():
        location = tuple(item["loc"])
        path = _format_location(location)
        kind = item["type"]
        if kind == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(location))
            lines.append(f"{path}: unknown key; remove or rename it (valid keys here: {allowed})")
            continue
        if kind == "missing":
            lines.append(f"{path}: required key is missing; add it (see examples/local-cpu.yaml)")
            continue
        message = item["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        value = _lookup(raw, location) if location else None
        if location and kind not in ("value_error", "assertion_error"):
            lines.append(f"{path}: invalid value {value!r}: {message}")
        else:
            lines.append(f"{path}: {message}")
    return "\n".join(lines)


def parse_config(raw: Any, source: str = "<config>") -> Config:
    """Validate already-parsed YAML data; raise ConfigError naming every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source} is invalid:\n{describe_validation_error(error, raw)}") from None


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML experiment config."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass the path of an experiment YAML file") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return parse_config(raw, source=str(path))


def dump_config(config: Config) -> str:
    """Return the resolved config (defaults filled in) as YAML."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
