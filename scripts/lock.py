"""Write constraints.txt: exact versions of the runtime dependency closure.

The closure is computed from the packages installed in the current environment, starting at the
`[project] dependencies` of pyproject.toml, so run it from the venv that was installed and tested
(`make lock`). Packages that only the TPU image installs (libtpu) are not installed here, so
their existing pins are kept. A missing TPU pin is an error.

Usage: python scripts/lock.py [--check]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "constraints.txt"

# Installed only by the `tpu` image target through `jax[tpu]`.
TPU_ONLY = ("libtpu",)

HEADER = """\
# Exact versions of the runtime dependency closure of pyproject.toml (Linux x86_64, CPython 3.11).
# The image build installs with `-c constraints.txt`; tests/test_image_lock.py checks that these
# pins agree with pyproject.toml. Regenerate with `make lock` (python scripts/lock.py) from the
# venv that was installed and tested. torch carries the +cpu local version: the build takes it
# from the PyTorch CPU index, never the multi-GB CUDA build on PyPI.
"""

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def read_pins(path: Path) -> dict[str, str]:
    """Return {canonical name: version} for the `name==version` lines of a constraints file."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: expected `name==version`, got {raw!r}")
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def project_requirements() -> list[Requirement]:
    with PYPROJECT.open("rb") as handle:
        project = tomllib.load(handle)["project"]
    return [Requirement(text) for text in project["dependencies"]]


def installed_closure(roots: list[Requirement]) -> dict[str, str]:
    """Walk the installed distributions' requirements from `roots`; return {name: version}."""
    environment = default_environment()
    versions: dict[str, str] = {}
    visited: set[tuple[str, str]] = set()
    pending = [(requirement, "") for requirement in roots]

    while pending:
        requirement, extra = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({**environment, "extra": extra}):
            continue

        name = canonicalize_name(requirement.name)
        requested_extras = {""} | set(requirement.extras)
        if requested_extras <= {requested for seen, requested in visited if seen == name}:
            continue
        visited.update((name, requested) for requested in requested_extras)

        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is in the dependency closure but not installed: run `pip install -e .`") from None
        versions[name] = distribution.version

        # Each child is queued once per requested extra because its marker may read `extra`.
        for text in distribution.requires or []:
            for requested in requested_extras:
                pending.append((Requirement(text), requested))

    return versions


def render(pins: dict[str, str]) -> str:
    lines = [f"{name}=={pins[name]}" for name in sorted(pins)]
    return HEADER + "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if constraints.txt differs instead of writing it")
    args = parser.parse_args()

    pins = installed_closure(project_requirements())
    existing = read_pins(CONSTRAINTS) if CONSTRAINTS.exists() else {}
    for name in TPU_ONLY:
        if name not in existing:
            raise SystemExit(f"constraints.txt has no {name} pin: add `{name}==VERSION` by hand (see jax's tpu extra)")
        pins[name] = existing[name]

    text = render(pins)
    if args.check:
        if CONSTRAINTS.read_text() != text:
            print("constraints.txt is out of date: run `make lock`", file=sys.stderr)
            return 1
        return 0

    CONSTRAINTS.write_text(text)
    print(f"wrote {CONSTRAINTS} ({len(pins)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
