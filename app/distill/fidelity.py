"""Teacher fidelity check: the converted EasyDeL teacher must match transformers on real text.

EasyDeL converts a checkpoint by reading its config into its own classes. A field it does not
read silently takes a default, and the teacher becomes a different model that still produces
plausible text. This check scores the same token blocks with both implementations and rejects
the run when they disagree beyond the configured tolerance. Measured on SmolLM2-135M (fp32,
CPU, 4 x 128 KJV tokens): a faithful conversion gives a largest logit difference of 0.4 to 0.7
and 98-100% top-1 agreement, because near-ties flip between implementations. The rotary base
falling back to 10,000 gives differences up to 14 and about 81% agreement. The defaults (max difference
2.0, agreement 0.97) sit between the two.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from distill.config import FidelityCheckConfig
from distill.exitcodes import InvalidInputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FidelityReport:
    positions: int
    top1_agreement: float
    max_logit_diff: float
    easydel_perplexity: float
    reference_perplexity: float

    def describe(self) -> str:
        return (
            f"{self.positions} positions: top-1 agreement {self.top1_agreement:.2%}, largest logit difference "
            f"{self.max_logit_diff:.3f}, perplexity {self.easydel_perplexity:.2f} (EasyDeL) vs "
            f"{self.reference_perplexity:.2f} (transformers)"
        )


def _perplexity(logits: np.ndarray, labels: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    return float(np.exp(-picked.mean()))


def easydel_logits(module, input_ids: np.ndarray) -> np.ndarray:
    """Run the EasyDeL model under jit and return the full logits on every process.

    Called eagerly, EasyDeL's output classes iterate over their arrays, which fails for arrays
    sharded across processes; inside jit they only see tracers. The inputs and logits are
    replicated over the mesh, so each process can read the whole result.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from distill.sharding import replicated_host_array, spread_over_mesh

    mesh = module.mesh
    state = spread_over_mesh(module.to_state(), mesh)

    def forward(state, input_ids):
        return state.model(input_ids=input_ids, attention_mask=jnp.ones_like(input_ids)).logits

    forward = jax.jit(forward, out_shardings=NamedSharding(mesh, PartitionSpec()))
    with mesh:
        logits = forward(state, replicated_host_array(mesh, input_ids.astype(np.int32)))
    return np.asarray(logits.addressable_data(0), dtype=np.float32)


def reference_logits(folder: str, input_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(input_ids, dtype=torch.long)).logits
    del model
    return logits[..., :vocab_size].numpy()


def compare(easydel: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> FidelityReport:
    agreement = float((easydel.argmax(-1) == reference.argmax(-1)).mean())
    return FidelityReport(
        positions=int(labels.size),
        top1_agreement=agreement,
        max_logit_diff=float(np.abs(easydel - reference).max()),
        easydel_perplexity=_perplexity(easydel, labels),
        reference_perplexity=_perplexity(reference, labels),
    )


def check_teacher_fidelity(
    config: FidelityCheckConfig, module, folder: str, blocks: list[dict[str, np.ndarray]], vocab_size: int
) -> FidelityReport | None:
    """Score `blocks` with both implementations; raise InvalidInputError outside the tolerance."""
    if not config.enabled:
        logger.warning("teacher fidelity check skipped (teacher.fidelity_check.enabled is false)")
        return None
    started = time.monotonic()
    length = config.sequence_length
    input_ids = np.stack([block["input_ids"][:length] for block in blocks[: config.num_sequences]])
    labels = np.stack([block["labels"][:length] for block in blocks[: config.num_sequences]])
    report = compare(easydel_logits(module, input_ids), reference_logits(folder, input_ids, vocab_size), labels)
    elapsed = time.monotonic() - started

    problems = []
    if report.top1_agreement < config.min_top1_agreement:
        problems.append(f"top-1 agreement {report.top1_agreement:.2%} is below {config.min_top1_agreement:.2%}")
    if report.max_logit_diff > config.max_logit_diff:
        problems.append(f"largest logit difference {report.max_logit_diff:.3f} exceeds {config.max_logit_diff}")
    if problems:
        raise InvalidInputError(
            "teacher fidelity check failed: the EasyDeL conversion of the teacher does not match transformers ("
            + "; ".join(problems)
            + f"; {report.describe()}). A checkpoint config field was probably not carried over; compare the "
            "teacher's config.json with the fields logged at load time"
        )
    logger.info("teacher fidelity check passed in %.1fs: %s", elapsed, report.describe())
    return report
