"""Cloud TPU slice shapes on GKE, read from the table the Helm chart renders from.

The table (tpu-topologies.yaml, shipped in the package as a link to the chart's
files/tpu-topologies.yaml) is the single source for accelerator labels, topologies,
chips per host, hosts per slice and machine types, so the chart and the runtime agree.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

logger = logging.getLogger(__name__)

TABLE_RESOURCE = "tpu-topologies.yaml"


class UnknownTpuTypeError(ValueError):
    """A TPU type that the topology table does not list; the message names the valid types."""


@dataclass(frozen=True)
class TpuTopology:
    """One slice shape: what the chart requests from GKE and what the runtime expects to see."""

    tpu_type: str
    accelerator: str
    """Value of the node label cloud.google.com/gke-tpu-accelerator."""
    topology: str
    """Value of the node label cloud.google.com/gke-tpu-topology, such as 2x4x4."""
    chips_per_host: int
    """google.com/tpu request of each pod (chips)."""
    hosts: int
    """Pods (VMs) per slice (count)."""
    machine_type: str
    """GCE machine type of the node pool."""
    peak_bf16_tflops_per_chip: float
    """Published dense bf16 peak of one chip (TFLOP/s), used for MFU."""

    @property
    def chips(self) -> int:
        """Chips in one slice (count)."""
        return self.chips_per_host * self.hosts


def _topology_chips(topology: str) -> int:
    return math.prod(int(part) for part in topology.split("x"))


@lru_cache(maxsize=1)
def load_topology_table() -> dict[str, TpuTopology]:
    """Read the packaged table and return its rows keyed by TPU type (e.g. ``v4-64``).

    Raises ValueError when a row is inconsistent (its topology does not hold
    chips_per_host * hosts chips), because the chart would then request the wrong slice.
    """
    text = resources.files("distill").joinpath(TABLE_RESOURCE).read_text(encoding="utf-8")
    raw: dict[str, Any] = yaml.safe_load(text)
    families = raw["families"]

    table: dict[str, TpuTopology] = {}
    for tpu_type, row in raw["types"].items():
        family = families[row["family"]]
        entry = TpuTopology(
            tpu_type=tpu_type,
            accelerator=family["accelerator"],
            topology=row["topology"],
            chips_per_host=int(row["chips_per_host"]),
            hosts=int(row["hosts"]),
            machine_type=row.get("machine_type", family["machine_type"]),
            peak_bf16_tflops_per_chip=float(family["peak_bf16_tflops_per_chip"]),
        )
        if _topology_chips(entry.topology) != entry.chips:
            raise ValueError(
                f"{TABLE_RESOURCE}: {tpu_type} has topology {entry.topology} "
                f"({_topology_chips(entry.topology)} chips) but chips_per_host * hosts = {entry.chips}"
            )
        table[tpu_type] = entry
    return table


def lookup(tpu_type: str) -> TpuTopology:
    """Return the slice shape of `tpu_type`; raise UnknownTpuTypeError listing the valid types."""
    table = load_topology_table()
    try:
        return table[tpu_type]
    except KeyError:
        valid = ", ".join(table)
        raise UnknownTpuTypeError(f"unknown TPU type {tpu_type!r}; use one of: {valid}") from None
