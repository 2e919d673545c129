"""Checkpoints on local disk or gs://, with a commit marker that makes them count.

Layout under `training.save_directory`:

    step-00000100/
        state/        student parameters, optimizer state and step (Orbax, written by all processes)
        data.json     stream position after the last batch of that step
        COMMITTED     written last, by process 0, after every process finished its part

A folder without COMMITTED is an interrupted save: resume ignores it and the next successful
save deletes it. Retention deletes the oldest committed checkpoints beyond `checkpoints_to_keep`
only after a newer one is committed, so a crash at any point leaves at least one complete one.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

COMMIT_MARKER = "COMMITTED"
DATA_FILE = "data.json"
STATE_DIR = "state"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: str
    committed: bool


class CheckpointStore:
    """Lists, writes and prunes checkpoints under one local or gs:// folder."""

    def __init__(self, root: str, keep: int, is_writer: bool) -> None:
        import os

        import fsspec

        # Orbax's tensorstore writer accepts only absolute local paths, so a relative
        # save_directory (as in the demo config) is resolved against the working directory.
        if "://" not in root:
            root = os.path.abspath(root)
        self.root = root.rstrip("/")
        self.keep = keep
        self.is_writer = is_writer
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)
        self._checkpointer = None

    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _fs_path(self, *parts: str) -> str:
        return "/".join([self._root_path.rstrip("/"), *parts])

    def list(self) -> list[CheckpointInfo]:
        if not self.fs.exists(self._root_path):
            return []
        found = []
        for entry in self.fs.ls(self._root_path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            match = _STEP_DIR.match(name)
            if match is None:
                continue
            committed = self.fs.exists(self._fs_path(name, COMMIT_MARKER))
            found.append(CheckpointInfo(step=int(match.group(1)), path=self._join(name), committed=committed))
        return sorted(found, key=lambda info: info.step)

    def latest(self) -> CheckpointInfo | None:
        """Return the newest committed checkpoint, logging any newer incomplete ones."""
        checkpoints = self.list()
        committed = [info for info in checkpoints if info.committed]
        newest = committed[-1] if committed else None
        for info in checkpoints:
            if not info.committed and (newest is None or info.step > newest.step):
                logger.warning("ignoring incomplete checkpoint %s (no %s marker)", info.path, COMMIT_MARKER)
        return newest

    def _orbax(self):
        if self._checkpointer is None:
            import orbax.checkpoint as ocp

            self._checkpointer = ocp.StandardCheckpointer()
        return self._checkpointer

    def save(self, step: int, state_tree: Any, data_position: dict[str, Any], extra: dict[str, Any]) -> float:
        """Write one checkpoint on every process; return the seconds it took."""
        from jax.experimental import multihost_utils

        started = time.monotonic()
        name = step_dir_name(step)
        if self.is_writer and self.fs.exists(self._fs_path(name)):
            logger.warning("removing leftover folder %s before saving step %d", self._join(name), step)
            self.fs.rm(self._fs_path(name), recursive=True)
        multihost_utils.sync_global_devices(f"distill-checkpoint-start-{step}")

        checkpointer = self._orbax()
        checkpointer.save(self._join(name, STATE_DIR), state_tree)
        checkpointer.wait_until_finished()
        multihost_utils.sync_global_devices(f"distill-checkpoint-written-{step}")

        if self.is_writer:
            with self.fs.open(self._fs_path(name, DATA_FILE), "w") as handle:
                json.dump(data_position, handle)
            marker = {"step": step, "time": time.time(), **extra}
            with self.fs.open(self._fs_path(name, COMMIT_MARKER), "w") as handle:
                json.dump(marker, handle)
            self._prune(step)
        multihost_utils.sync_global_devices(f"distill-checkpoint-committed-{step}")
        return time.monotonic() - started

    def _prune(self, newest_step: int) -> None:
        checkpoints = self.list()
        committed = [info for info in checkpoints if info.committed]
        for info in committed[: max(0, len(committed) - self.keep)]:
            logger.info("deleting checkpoint %s (keeping the newest %d)", info.path, self.keep)
            self.fs.rm(self._fs_path(step_dir_name(info.step)), recursive=True)
        for info in checkpoints:
            if not info.committed and info.step < newest_step:
                logger.info("deleting incomplete checkpoint %s", info.path)
                self.fs.rm(self._fs_path(step_dir_name(info.step)), recursive=True)

    def restore(self, info: CheckpointInfo, target_tree: Any) -> tuple[Any, dict[str, Any]]:
        """Read a checkpoint into the shapes and shardings of `target_tree`.

        Return the restored tree and the saved data position, with the commit time (Unix
        seconds) added under `committed_at`.
        """
        import jax
        import orbax.checkpoint as ocp

        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target_tree)
        restored = self._orbax().restore(self._join(step_dir_name(info.step), STATE_DIR), abstract)
        with self.fs.open(self._fs_path(step_dir_name(info.step), DATA_FILE), "r") as handle:
            data_position = json.load(handle)
        with self.fs.open(self._fs_path(step_dir_name(info.step), COMMIT_MARKER), "r") as handle:
            data_position["committed_at"] = json.load(handle)["time"]
        return restored, data_position
