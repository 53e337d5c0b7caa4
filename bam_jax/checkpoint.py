"""Orbax checkpoints of the train state, with the config saved beside them.

Why a wrapper: the trainer needs three policies that Orbax leaves to its caller: restore onto the
*current* mesh (so a run saved on 8 devices continues on 4), fall back to the previous step when
the newest one cannot be read (a torn or damaged write), and refuse a checkpoint of another model
with one clear line instead of a tree-mismatch traceback.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_LOG = logging.getLogger(__name__)


def workdir_path(workdir: str) -> epath.Path:
    """A local folder or a bucket URI (gs://...): TPU VMs write their workdirs to buckets."""
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a checkpoint that does not fit the configured model."""


class Checkpointer:
    """Async CheckpointManager over `workdir/checkpoints`, keeping the last `max_to_keep` steps."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = workdir_path(workdir) / "checkpoints"
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True),
            item_names=("state", "config", "boxes"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, config: ml_collections.ConfigDict,
             boxes: np.ndarray | None = None) -> None:
        """`boxes`: the ContrastiveCrop box table in use, a host array identical on every
        process (Orbax writes it once), so a resumed run crops with the same boxes."""
        items = dict(state=ocp.args.StandardSave(state),
                     config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))
        if boxes is not None:
            items["boxes"] = ocp.args.StandardSave({"boxes": np.asarray(boxes)})
        self._manager.save(step, args=ocp.args.Composite(**items))

    def restore_boxes(self, step: int, num_examples: int) -> np.ndarray | None:
        """The [num_examples, 4] box table saved with `step` (as a host array on every
        process), or None when that step has none."""
        if not (self.directory / str(step) / "boxes").exists():
            return None
        target = {"boxes": np.zeros((num_examples, 4), np.float32)}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                boxes=ocp.args.StandardRestore(target)))
        except ValueError as error:
            raise IncompatibleCheckpointError(
                f"the ContrastiveCrop boxes of step {step} in {self.directory} do not fit the "
                f"{num_examples} training examples ({_first_line(error)}); train on the data "
                f"the run started with, or use a new --workdir") from error
        return np.asarray(restored.boxes["boxes"])

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any] | None:
        """Restore the newest readable step onto the shardings of `abstract_state`.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` set: Orbax then
        reads every array straight into the current device layout. A step that fails to read is
        reported and skipped in favour of the one before it.
        """
        for step in reversed(self.all_steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))
            except Exception as error:  # noqa: BLE001 - any damaged file: fall back, say why
                # Another model only when the step's own metadata is intact and describes other
                # arrays; a torn step (missing or truncated files) is never mistaken for one.
                if _saved_arrays_differ(self.directory / str(step) / "state", abstract_state):
                    raise IncompatibleCheckpointError(
                        f"the checkpoint in {self.directory} (step {step}) does not match the "
                        f"configured model; use a new --workdir or the config it was trained with"
                    ) from error
                _LOG.warning("checkpoint step %d is unreadable (%s); trying the previous one",
                             step, _first_line(error))
                continue
            return step, restored.state
        return None

    def restore_config(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _saved_arrays_differ(state_dir: epath.Path, abstract_state: Any) -> bool:
    """Whether a step's readable metadata lists other (shape, dtype) arrays than the state's.

    False when the metadata itself cannot be read: that step is damaged, not another model.
    """
    try:
        metadata = ocp.StandardCheckpointHandler().metadata(state_dir)
    except Exception:  # noqa: BLE001
        return False
    saved = jax.tree.leaves(getattr(metadata, "tree", metadata))
    if not saved or not all(hasattr(m, "shape") and hasattr(m, "dtype") for m in saved):
        return False

    def signature(leaves):
        return sorted((tuple(x.shape), str(x.dtype)) for x in leaves)

    return signature(saved) != signature(jax.tree.leaves(abstract_state))


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `state` placed on `shardings` (the restore target)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        state, shardings)
