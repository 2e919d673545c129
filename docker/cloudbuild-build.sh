#!/usr/bin/env bash
# Build one image target with buildx and push it; called by cloudbuild.yaml.
# Environment: TARGET (tpu or cpu), IMAGE (registry path without tag), COMMIT_SHA, TAG_NAME
# (empty unless the build runs for a git tag), PIP_EXTRA_INDEX_URL.
set -euo pipefail

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' app/distill/__init__.py)
if [ -z "$version" ]; then
    echo "no __version__ found in app/distill/__init__.py" >&2
    exit 1
fi
if [ -n "${TAG_NAME:-}" ] && [ "$TAG_NAME" != "v$version" ]; then
    echo "git tag $TAG_NAME does not match the package version $version; tag v$version instead" >&2
    exit 1
fi

tags=(--tag "$IMAGE:$COMMIT_SHA")
if [ -n "${TAG_NAME:-}" ]; then
    tags+=(--tag "$IMAGE:$version")
fi

echo "building $TARGET as ${tags[*]}"
docker buildx build \
    --builder distill \
    --file docker/Dockerfile \
    --target "$TARGET" \
    --build-arg "VERSION=$version" \
    --build-arg "REVISION=$COMMIT_SHA" \
    --build-arg "PIP_EXTRA_INDEX_URL=$PIP_EXTRA_INDEX_URL" \
    --cache-from "type=registry,ref=$IMAGE:buildcache" \
    --cache-to "type=registry,ref=$IMAGE:buildcache,mode=max" \
    "${tags[@]}" \
    --push \
    .
echo "pushed ${tags[*]}"
