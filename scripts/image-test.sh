#!/usr/bin/env bash
# Build the distill image with buildah (no Docker daemon needed) and smoke-test it.
#
# Builds docker/Dockerfile against a local Debian bookworm base made with mmdebstrap. Debian's
# python3 is 3.11, the same minor version as the default python:3.11-slim-bookworm base. Then it
# runs `distill --help`, `distill --version` and `distill validate` inside the image with
# `buildah run`, and prints the image size and build time.
#
# Usage: scripts/image-test.sh [TARGET...]       (default: cpu; `cpu tpu` builds both)
# Needs: root, apt-get install -y --no-install-recommends buildah mmdebstrap
# Environment:
#   IMAGE_TEST_WHEELS   folder of extra wheels mounted into the build as find-links
#                       (default /opt/wheels when it exists; it holds torch's +cpu wheel here)
#   IMAGE_TEST_EXTRA_INDEX_URL  extra package index for the build (default: the PyTorch CPU
#                       index, or PyPI again when IMAGE_TEST_WHEELS supplies torch)
#   IMAGE_TEST_CA_BUNDLE  CA bundle mounted over the base image's bundle during the build
#                       (default /etc/ssl/certs/ca-certificates.crt of this machine)
#   IMAGE_TEST_KEEP=1   keep the built images and layer cache (default: remove them at the end)
#   IMAGE_TEST_WORK_DIR  buildah storage and scratch files (default /var/tmp/distill-image-test)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK_DIR=${IMAGE_TEST_WORK_DIR:-/var/tmp/distill-image-test}
mkdir -p "$WORK_DIR"
BASE_IMAGE=localhost/distill-base:bookworm-python3
# overlay storage in a private root: vfs copies the whole ~3 GB file tree for every layer, and a
# private root keeps this script away from other users' images.
BUILDAH=(buildah --storage-driver overlay --root "$WORK_DIR/storage" --runroot "$WORK_DIR/run")
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(cpu)
fi

log() {
    echo "image-test: $*" >&2
}

fail() {
    log "FAILED: $*"
    exit 1
}

for tool in buildah mmdebstrap; do
    command -v "$tool" >/dev/null \
        || fail "$tool not found; install it with: apt-get install -y --no-install-recommends buildah mmdebstrap"
done
[ "$(id -u)" -eq 0 ] || fail "run as root: buildah with the vfs driver and chroot isolation needs it here"

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/app/distill/__init__.py")
[ -n "$version" ] || fail "no __version__ found in app/distill/__init__.py"
revision=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)

# 1. Local base image: Debian bookworm minbase with python3, venv and pip (no registry pull).
if ! "${BUILDAH[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    log "creating base image $BASE_IMAGE with mmdebstrap"
    nice -n 10 mmdebstrap --quiet --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$WORK_DIR/base.tar"
    base_container=$("${BUILDAH[@]}" from --quiet scratch)
    "${BUILDAH[@]}" add --quiet "$base_container" "$WORK_DIR/base.tar" /
    "${BUILDAH[@]}" config --cmd /bin/bash "$base_container"
    "${BUILDAH[@]}" commit --quiet --rm "$base_container" "$BASE_IMAGE" >/dev/null
    rm -f "$WORK_DIR/base.tar"
fi

# 2. Package sources for the build. torch is pinned as its +cpu build, which only the PyTorch
# CPU index serves; here a local wheel folder can supply it instead.
wheels=${IMAGE_TEST_WHEELS-/opt/wheels}
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "VERSION=$version" --build-arg "REVISION=$revision")
# Machines that reach PyPI through a TLS-inspecting proxy trust its CA in the host bundle. The
# bundle is mounted for the build steps only, so it does not end up in a layer.
if [ -f "${IMAGE_TEST_CA_BUNDLE:=/etc/ssl/certs/ca-certificates.crt}" ]; then
    build_args+=(--volume "$IMAGE_TEST_CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
fi
if [ -n "$wheels" ] && [ -d "$wheels" ]; then
    build_args+=(--volume "$wheels:/find-links:ro" --build-arg "PIP_FIND_LINKS=/find-links"
        --build-arg "PIP_EXTRA_INDEX_URL=${IMAGE_TEST_EXTRA_INDEX_URL:-https://pypi.org/simple}")
elif [ -n "${IMAGE_TEST_EXTRA_INDEX_URL:-}" ]; then
    build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=$IMAGE_TEST_EXTRA_INDEX_URL")
fi

cleanup() {
    if [ -n "${container:-}" ]; then
        "${BUILDAH[@]}" rm "$container" >/dev/null 2>&1 || true
    fi
    if [ "${IMAGE_TEST_KEEP:-0}" != 1 ]; then
        # Drops the intermediate layer images too, so that the next run measures a cold build;
        # only the base image stays.
        local base_id image_id
        base_id=$("${BUILDAH[@]}" images --quiet "$BASE_IMAGE" 2>/dev/null || true)
        for image_id in $("${BUILDAH[@]}" images --all --quiet 2>/dev/null); do
            if [ "$image_id" != "$base_id" ]; then
                "${BUILDAH[@]}" rmi --force "$image_id" >/dev/null 2>&1 || true
            fi
        done
    fi
}
trap cleanup EXIT

# Run a command in the image as its default user; the config is mounted where the chart mounts it.
run_in() {
    local config=$1
    shift
    "${BUILDAH[@]}" run --isolation chroot --volume "$config:/etc/distill/config.yaml:ro" "$container" -- "$@"
}

expect_equal() {
    local what=$1 actual=$2 expected=$3
    [ "$actual" = "$expected" ] || fail "$what: expected '$expected', got '$actual'"
    log "ok: $what = $actual"
}

summary=()
for target in "${TARGETS[@]}"; do
    image="localhost/distill:$target-test"

    # 3. Build, timed. nice: build machines are shared.
    log "building target $target as $image"
    started=$(date +%s)
    # --layers: the tpu target reuses the dependency layers built for cpu, as CI's cache does.
    nice -n 10 "${BUILDAH[@]}" bud --isolation chroot --pull=never --layers --format docker --quiet \
        --file "$ROOT/docker/Dockerfile" --target "$target" --tag "$image" \
        "${build_args[@]}" "$ROOT" >/dev/null
    build_seconds=$(( $(date +%s) - started ))
    size=$("${BUILDAH[@]}" images --format '{{.Size}}' "$image")
    log "built $image in ${build_seconds}s, size $size"

    # 4. Metadata: non-root user, entrypoint, OCI labels.
    container=$("${BUILDAH[@]}" from --pull=never --quiet "$image")
    expect_equal "$target user" "$("${BUILDAH[@]}" inspect --format '{{.OCIv1.Config.User}}' "$container")" "1000:1000"
    expect_equal "$target entrypoint" "$("${BUILDAH[@]}" inspect --format '{{.OCIv1.Config.Entrypoint}}' "$container")" "[distill]"
    expect_equal "$target version label" \
        "$("${BUILDAH[@]}" inspect --format '{{index .OCIv1.Config.Labels "org.opencontainers.image.version"}}' "$container")" "$version"
    expect_equal "$target revision label" \
        "$("${BUILDAH[@]}" inspect --format '{{index .OCIv1.Config.Labels "org.opencontainers.image.revision"}}' "$container")" "$revision"

    # 5. Commands inside the image.
    cat > "$WORK_DIR/invalid.yaml" <<'YAML'
experiment:
  name: Not A Valid Name!
training:
  total_batch_size: -1
YAML
    expect_equal "$target uid inside" "$(run_in "$ROOT/examples/local-cpu.yaml" id -u)" "1000"
    run_in "$ROOT/examples/local-cpu.yaml" distill --help >/dev/null || fail "$target: distill --help failed"
    log "ok: $target distill --help"
    expect_equal "$target distill --version" "$(run_in "$ROOT/examples/local-cpu.yaml" distill --version)" "distill $version"
    run_in "$ROOT/examples/local-cpu.yaml" distill validate /etc/distill/config.yaml \
        > "$WORK_DIR/resolved.yaml" 2> "$WORK_DIR/validate.err" \
        || fail "$target: distill validate of examples/local-cpu.yaml failed: $(cat "$WORK_DIR/validate.err")"
    grep -q '^  name: local-cpu' "$WORK_DIR/resolved.yaml" || fail "$target: resolved config lacks experiment.name local-cpu"
    log "ok: $target distill validate examples/local-cpu.yaml"
    status=0
    run_in "$WORK_DIR/invalid.yaml" distill validate /etc/distill/config.yaml >/dev/null 2>&1 || status=$?
    expect_equal "$target exit code of validate on an invalid config" "$status" "2"
    # shellcheck disable=SC2016  # expanded by the shell inside the image, as the image user
    run_in "$ROOT/examples/local-cpu.yaml" sh -c 'touch "$HOME/probe" && touch "$XDG_CACHE_HOME/probe" && touch /tmp/probe' \
        || fail "$target: HOME or /tmp not writable by the image user"
    log "ok: $target HOME and /tmp writable"
    run_in "$ROOT/examples/local-cpu.yaml" env ENABLE_DISTRIBUTED_INIT=0 JAX_PLATFORMS=cpu python -c \
        'import easydel, jax, torch; assert jax.numpy.ones(3).sum() == 3; print(jax.__version__, torch.__version__)' \
        >/dev/null 2>&1 || fail "$target: importing easydel, jax and torch failed"
    log "ok: $target imports easydel, jax and torch; a jitted sum runs on CPU"
    if [ "$target" = tpu ]; then
        run_in "$ROOT/examples/local-cpu.yaml" python -c 'import libtpu' \
            || fail "tpu: libtpu is not importable"
        log "ok: tpu imports libtpu"
    fi

    # 6. Nothing from the build context beyond the package ended up in the image.
    for path in /src /opt/distill/wheels/tests /cache/.git; do
        if run_in "$ROOT/examples/local-cpu.yaml" test -e "$path" 2>/dev/null; then
            fail "$target: $path exists in the image"
        fi
    done
    log "ok: $target has no build sources"

    "${BUILDAH[@]}" rm "$container" >/dev/null
    container=""
    summary+=("$target: size $size, build ${build_seconds}s")
done

log "PASSED"
for line in "${summary[@]}"; do
    log "$line"
done
