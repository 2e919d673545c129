"""gs:// paths against a local Cloud Storage emulator: the checkpoint store and a gs:// teacher.

The emulator (PyPI gcp-storage-emulator) listens on 127.0.0.1. gcsfs follows
STORAGE_EMULATOR_HOST, and tensorstore, which Orbax uses for array data, follows
TENSORSTORE_GCS_HTTP_URL with the fixed token GOOGLE_AUTH_TOKEN_FOR_TESTING.

The emulator omits the `x-goog-generation` and `x-goog-metageneration` headers that Cloud
Storage sends with object downloads and object resources, and tensorstore reads them for its
conditional writes, so the fixture adds them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ASSETS, tiny_config, write_config

pytestmark = pytest.mark.slow

BUCKET = "distill-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def gcs_env():
    """Start an in-memory emulator; yield the environment that points clients at it."""
    from gcp_storage_emulator import server as emulator
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def with_generation_headers(handler):
        def handle(request, response, storage, *args, **kwargs):
            params = getattr(request, "params", {}) or {}
            if handler is objects.download:
                try:
                    resource = storage.get_file_obj(params["bucket_name"], params["object_id"])
                    response["x-goog-generation"] = resource["generation"]
                    response["x-goog-metageneration"] = resource["metageneration"]
                except NotFound:
                    pass
            result = handler(request, response, storage, *args, **kwargs)
            content = getattr(response, "_content", "")
            if isinstance(content, str) and content.startswith("{") and '"generation"' in content:
                resource = json.loads(content)
                if "generation" in resource:
                    response["x-goog-generation"] = resource["generation"]
                    response["x-goog-metageneration"] = resource.get("metageneration", "1")
            return result

        return handle

    emulator.HANDLERS = tuple(
        (pattern, {method: with_generation_headers(handler) for method, handler in handlers.items()})
        for pattern, handlers in emulator.HANDLERS
    )
    create_server = emulator.create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": endpoint,
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_store_prunes_and_skips_incomplete(gcs_env):
    import fsspec
    import jax.numpy as jnp
    import numpy as np

    from distill.checkpoints import CheckpointStore

    os.environ["ENABLE_DISTRIBUTED_INIT"] = "0"
    store = CheckpointStore(f"gs://{BUCKET}/store", keep=1, is_writer=True)
    tree = {"weights": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(0)}
    store.save(1, tree, {"position": "one"}, {})
    store.save(2, {**tree, "step": jnp.asarray(2)}, {"position": "two"}, {})

    filesystem = fsspec.filesystem("gs")
    filesystem.pipe(f"{BUCKET}/store/step-00000003/state/partial", b"interrupted save")
    steps = [(info.step, info.committed) for info in store.list()]
    assert steps == [(2, True), (3, False)]

    latest = store.latest()
    assert latest.step == 2
    restored, data_position = store.restore(latest, tree)
    assert data_position["position"] == "two"
    assert data_position["committed_at"] > 0
    assert int(restored["step"]) == 2
    np.testing.assert_array_equal(np.asarray(restored["weights"]), np.arange(6.0).reshape(2, 3))


@pytest.fixture(scope="module")
def gcs_teacher(gcs_env, random_teacher):
    """The random test teacher, uploaded to gs://."""
    import fsspec

    fsspec.filesystem("gs").put(str(random_teacher) + "/", f"{BUCKET}/teacher/", recursive=True)
    return f"gs://{BUCKET}/teacher"


def test_train_reads_teacher_from_gcs(gcs_env, gcs_teacher, assets, tmp_path):
    # NOTE: the checkpoints stay local here. A full run saving to the emulator failed now and
    # then with tensorstore's "Malformed StorageGeneration" on the OCDBT manifest, because the
    # emulator's generation handling is incomplete. The store test above covers gs:// checkpoints.
    config = tiny_config(
        tmp_path / "checkpoints",
        teacher={"path": gcs_teacher},
        tokenizer={"path": str(ASSETS / "smollm2-135m")},
        training={"max_training_steps": 2, "save_interval_steps": None},
    )
    env = dict(os.environ, **gcs_env, PYTHONUNBUFFERED="1", DISTILL_CACHE_DIR=str(tmp_path / "cache"))
    path = write_config(tmp_path / "config.yaml", config)

    first = subprocess.run([sys.executable, "-m", "distill", "train", str(path)], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"downloading {gcs_teacher}" in first.stdout
    assert "teacher fidelity check passed" in first.stdout

    config["training"]["max_training_steps"] = 3
    write_config(path, config)
    second = subprocess.run([sys.executable, "-m", "distill", "train", str(path)], capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"using cached copy of {gcs_teacher}" in second.stdout
    assert "at step 2" in second.stdout
    summary = json.loads((tmp_path / "checkpoints" / "summary.json").read_text())
    assert summary["steps"] == 3
