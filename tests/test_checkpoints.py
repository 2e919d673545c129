"""The checkpoint store on local disk: relative paths, commit markers, pruning and restore."""

from __future__ import annotations

import json
import os

import numpy as np

os.environ["ENABLE_DISTRIBUTED_INIT"] = "0"


def test_relative_directory_saves_and_restores(tmp_path, monkeypatch):
    import jax.numpy as jnp

    from distill.checkpoints import CheckpointStore

    monkeypatch.chdir(tmp_path)
    store = CheckpointStore("runs/demo/checkpoints", keep=2, is_writer=True)
    tree = {"weights": jnp.arange(4.0), "step": jnp.asarray(3)}
    store.save(3, tree, {"position": "after step 3"}, {"experiment": "demo"})

    marker = json.loads((tmp_path / "runs/demo/checkpoints/step-00000003/COMMITTED").read_text())
    assert marker["step"] == 3
    assert marker["experiment"] == "demo"
    latest = store.latest()
    assert latest.path == str(tmp_path / "runs/demo/checkpoints/step-00000003")
    restored, data_position = store.restore(latest, tree)
    np.testing.assert_array_equal(np.asarray(restored["weights"]), np.arange(4.0))
    assert data_position["position"] == "after step 3"


def test_keeps_newest_and_ignores_incomplete(tmp_path):
    import jax.numpy as jnp

    from distill.checkpoints import CheckpointStore

    store = CheckpointStore(str(tmp_path / "checkpoints"), keep=2, is_writer=True)
    tree = {"weights": jnp.zeros(2)}
    for step in (1, 2, 3):
        store.save(step, tree, {"position": step}, {})
    (tmp_path / "checkpoints" / "step-00000004" / "state").mkdir(parents=True)

    listed = [(info.step, info.committed) for info in store.list()]
    assert listed == [(2, True), (3, True), (4, False)]
    assert store.latest().step == 3
