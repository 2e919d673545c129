"""gs:// paths against a local Cloud Storage emulator: checkpoints, resume and a gs:// teacher.

The emulator (PyPI gcp-storage-emulator) listens on 127.0.0.1. gcsfs follows
STORAGE_EMULATOR_HOST, and tensorstore, which Orbax uses for array data, follows
TENSORSTORE_GCS_HTTP_URL with the fixed token GOOGLE_AUTH_TOKEN_FOR_TESTING.

The emulator's media download omits the `x-goog-generation` header that Cloud Storage sends
and tensorstore needs for its conditional writes, so the fixture adds it.
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

    def download_with_generation(request, response, storage, *args, **kwargs):
        try:
            resource = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = resource["generation"]
            response["x-goog-metageneration"] = resource["metageneration"]
        except NotFound:
            pass
        return objects.download(request, response, storage, *args, **kwargs)

    emulator.HANDLERS = tuple(
        (pattern, {method: (download_with_generation if handler is objects.download else handler) for method, handler in handlers.items()})
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
def gcs_teacher(gcs_env, tmp_path_factory):
    """A random 1-layer Llama with the demo tokenizer's vocabulary, uploaded to gs://."""
    import fsspec
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gcs-teacher")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    fsspec.filesystem("gs").put(str(folder) + "/", f"{BUCKET}/teacher/", recursive=True)
    return f"gs://{BUCKET}/teacher"


def test_train_checkpoints_and_resumes_on_gcs(gcs_env, gcs_teacher, assets, tmp_path):
    import fsspec

    save_directory = f"gs://{BUCKET}/runs/resume"
    config = tiny_config(
        save_directory,
        teacher={"path": gcs_teacher},
        tokenizer={"path": str(ASSETS / "smollm2-135m")},
        training={"max_training_steps": 3, "save_interval_steps": 2},
    )
    env = dict(os.environ, **gcs_env, PYTHONUNBUFFERED="1", DISTILL_CACHE_DIR=str(tmp_path / "cache"))
    path = write_config(tmp_path / "config.yaml", config)

    first = subprocess.run([sys.executable, "-m", "distill", "train", str(path)], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"downloading {gcs_teacher}" in first.stdout
    assert "teacher fidelity check passed" in first.stdout

    filesystem = fsspec.filesystem("gs")
    names = sorted(entry.rsplit("/", 1)[-1] for entry in filesystem.ls(f"{BUCKET}/runs/resume"))
    assert "step-00000002" in names
    assert "step-00000003" in names
    assert filesystem.exists(f"{BUCKET}/runs/resume/step-00000003/COMMITTED")
    summary = json.loads(filesystem.cat(f"{BUCKET}/runs/resume/summary.json"))
    assert summary["steps"] == 3

    config["training"]["max_training_steps"] = 5
    config["training"]["save_interval_steps"] = 5
    write_config(path, config)
    second = subprocess.run([sys.executable, "-m", "distill", "train", str(path)], capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resumed from checkpoint {save_directory}/step-00000003 at step 3" in second.stdout
    assert f"using cached copy of {gcs_teacher}" in second.stdout
    summary = json.loads(filesystem.cat(f"{BUCKET}/runs/resume/summary.json"))
    assert summary["steps"] == 5
    assert summary["tokens"] == 5 * 2 * 64
