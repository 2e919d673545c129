"""constraints.txt agrees with pyproject.toml, the installed environment and jax's TPU extra."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCK_SCRIPT = REPO_ROOT / "scripts" / "lock.py"

sys.path.insert(0, str(LOCK_SCRIPT.parent))
import lock  # noqa: E402  (scripts/ is not a package)


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    return lock.read_pins(lock.CONSTRAINTS)


@pytest.fixture(scope="module")
def dependencies() -> list[Requirement]:
    with (REPO_ROOT / "pyproject.toml").open("rb") as handle:
        project = tomllib.load(handle)["project"]
    return [Requirement(text) for text in project["dependencies"]]


def test_dependencies_pinned_exactly(dependencies):
    for requirement in dependencies:
        operators = [specifier.operator for specifier in requirement.specifier]
        assert operators == ["=="], f"{requirement}: pyproject.toml pins exact versions"


def test_dependencies_in_constraints(dependencies, pins):
    for requirement in dependencies:
        assert canonicalize_name(requirement.name) in pins, requirement.name


def test_constraints_match_pyproject(dependencies, pins):
    # `==2.13.0` admits the local build `2.13.0+cpu` (PEP 440), so torch's CPU pin agrees.
    for requirement in dependencies:
        pinned = pins[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(Version(pinned), prereleases=True), f"{requirement} vs {pinned}"


def test_torch_pinned_cpu_build(pins):
    assert Version(pins["torch"]).local == "cpu"


def test_libtpu_fits_jax_tpu_extra(pins):
    requirements = [Requirement(text) for text in importlib.metadata.requires("jax") or []]
    tpu_requirements = [r for r in requirements if r.marker is not None and r.marker.evaluate({"extra": "tpu"})]
    libtpu = [r for r in tpu_requirements if canonicalize_name(r.name) == "libtpu"]
    assert len(libtpu) == 1
    assert libtpu[0].specifier.contains(Version(pins["libtpu"]))


def test_tpu_extra_otherwise_locked(pins):
    requirements = [Requirement(text) for text in importlib.metadata.requires("jax") or []]
    for requirement in requirements:
        if requirement.marker is None or not requirement.marker.evaluate({"extra": "tpu"}):
            continue
        assert canonicalize_name(requirement.name) in pins, requirement.name


def test_constraints_match_environment(pins):
    # The tests run in the environment that the lock describes; a drift means `make lock` is due.
    for name, version in pins.items():
        if name in lock.TPU_ONLY:
            continue
        assert importlib.metadata.version(name) == version, name


def test_lock_check_clean():
    result = subprocess.run(
        [sys.executable, str(LOCK_SCRIPT), "--check"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


def test_read_pins_rejects_range(tmp_path):
    path = tmp_path / "constraints.txt"
    path.write_text("numpy>=2\n")
    with pytest.raises(ValueError, match="expected `name==version`"):
        lock.read_pins(path)
