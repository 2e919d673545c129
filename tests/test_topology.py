"""The TPU topology table that the chart and distill.topology share."""

from __future__ import annotations

import math

import pytest

from distill.topology import TpuTopology, UnknownTpuTypeError, load_topology_table, lookup

# Published GKE slice shapes (xpk system characteristics, cross-checked with MaxText):
# type -> (gke-tpu-accelerator label, topology, chips per host, hosts).
PUBLISHED_SHAPES = {
    "v4-8": ("tpu-v4-podslice", "2x2x1", 4, 1),
    "v4-16": ("tpu-v4-podslice", "2x2x2", 4, 2),
    "v4-32": ("tpu-v4-podslice", "2x2x4", 4, 4),
    "v4-64": ("tpu-v4-podslice", "2x4x4", 4, 8),
    "v4-128": ("tpu-v4-podslice", "4x4x4", 4, 16),
    "v4-256": ("tpu-v4-podslice", "4x4x8", 4, 32),
    "v5p-8": ("tpu-v5p-slice", "2x2x1", 4, 1),
    "v5p-16": ("tpu-v5p-slice", "2x2x2", 4, 2),
    "v5p-32": ("tpu-v5p-slice", "2x2x4", 4, 4),
    "v5p-64": ("tpu-v5p-slice", "2x4x4", 4, 8),
    "v5p-128": ("tpu-v5p-slice", "4x4x4", 4, 16),
    "v5litepod-16": ("tpu-v5-lite-podslice", "4x4", 4, 4),
    "v5litepod-32": ("tpu-v5-lite-podslice", "4x8", 4, 8),
    "v5litepod-64": ("tpu-v5-lite-podslice", "8x8", 4, 16),
    "v5litepod-128": ("tpu-v5-lite-podslice", "8x16", 4, 32),
    "v5litepod-256": ("tpu-v5-lite-podslice", "16x16", 4, 64),
    "v6e-1": ("tpu-v6e-slice", "1x1", 1, 1),
    "v6e-4": ("tpu-v6e-slice", "2x2", 4, 1),
    "v6e-16": ("tpu-v6e-slice", "4x4", 4, 4),
    "v6e-32": ("tpu-v6e-slice", "4x8", 4, 8),
    "v6e-64": ("tpu-v6e-slice", "8x8", 4, 16),
    "v6e-128": ("tpu-v6e-slice", "8x16", 4, 32),
    "v6e-256": ("tpu-v6e-slice", "16x16", 4, 64),
}


@pytest.mark.parametrize("tpu_type", sorted(PUBLISHED_SHAPES))
def test_table_matches_published(tpu_type):
    accelerator, topology, chips_per_host, hosts = PUBLISHED_SHAPES[tpu_type]
    entry = lookup(tpu_type)
    assert entry.accelerator == accelerator
    assert entry.topology == topology
    assert entry.chips_per_host == chips_per_host
    assert entry.hosts == hosts


@pytest.mark.parametrize("tpu_type", sorted(load_topology_table()))
def test_topology_holds_all_chips(tpu_type):
    entry = lookup(tpu_type)
    assert math.prod(int(part) for part in entry.topology.split("x")) == entry.chips


@pytest.mark.parametrize("tpu_type", sorted(load_topology_table()))
def test_type_name_counts(tpu_type):
    # v4 and v5p names count TensorCores (2 per chip); v5e and v6e names count chips.
    entry = lookup(tpu_type)
    family, count = tpu_type.rsplit("-", 1)
    cores_per_chip = 2 if family in ("v4", "v5p") else 1
    assert entry.chips * cores_per_chip == int(count)


@pytest.mark.parametrize("tpu_type", ["v5litepod-8", "v6e-8"])
def test_eight_chip_shapes_single_host(tpu_type):
    entry = lookup(tpu_type)
    assert entry.hosts == 1
    assert entry.chips_per_host == 8
    assert entry.machine_type.endswith("-8t")


def test_machine_type_default_from_family():
    assert lookup("v4-64").machine_type == "ct4p-hightpu-4t"
    assert lookup("v6e-256").machine_type == "ct6e-standard-4t"


def test_peak_flops_positive():
    for entry in load_topology_table().values():
        assert entry.peak_bf16_tflops_per_chip > 0, entry.tpu_type


def test_lookup_returns_dataclass():
    assert isinstance(lookup("v5p-32"), TpuTopology)


def test_unknown_type_lists_choices():
    with pytest.raises(UnknownTpuTypeError) as error:
        lookup("v4-63")
    assert "'v4-63'" in str(error.value)
    assert "v4-64" in str(error.value)
    assert "v6e-256" in str(error.value)
