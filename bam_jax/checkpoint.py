"""Orbax checkpoints of the train state, with the config saved beside them, and the workdir lease.

Why a wrapper: the trainer needs policies that Orbax leaves to its caller: restore onto the
*current* mesh (so a run saved on 8 devices continues on 4), fall back to the previous step when
the newest one cannot be read (a torn or damaged write), refuse a checkpoint of another model
with one clear line instead of a tree-mismatch traceback, let readers of a run (kNN, probe,
pictures, convert) open it without touching it, and let one run at a time write a workdir
(`WorkdirLock`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from bam_jax import cli

_LOG = logging.getLogger(__name__)


def workdir_path(workdir: str) -> epath.Path:
    """A local folder or a bucket URI (gs://...): TPU VMs write their workdirs to buckets."""
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a checkpoint that does not fit the configured model."""


class Checkpointer:
    """Async CheckpointManager over `workdir/checkpoints`, keeping the last `max_to_keep` steps.

    `read_only=True` is for readers of a run they do not own (kNN, linear probe, pictures,
    convert): nothing in the workdir is created, deleted or written, so the trainer's save in
    flight (`N.orbax-checkpoint-tmp-*`, which the writable manager deletes as a leftover of a
    crash) survives, and a read-only copy of a workdir can be read.
    """

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = workdir_path(workdir) / "checkpoints"
        self.read_only = read_only
        if read_only:
            # Orbax 0.12's read_only already skips saves and deletions and overrides create and
            # cleanup_tmp_directories (a warning each); they are set here so as not to depend
            # on that. Without root metadata it also skips that metadata's barrier.
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, cleanup_tmp_directories=False,
                save_root_metadata=False, enable_async_checkpointing=False, max_to_keep=None,
                save_interval_steps=0)
        else:
            if max_to_keep < 1:  # Orbax would delete every step, the one to resume from too
                raise ValueError(f"config.keep_checkpoints={max_to_keep}: keep at least 1 "
                                 f"checkpoint, or a rerun has nothing to resume from")
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "config", "boxes"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, config: ml_collections.ConfigDict,
             boxes: np.ndarray | None = None) -> None:
        """`boxes`: the ContrastiveCrop box table in use, a host array identical on every
        process (Orbax writes it once), so a resumed run crops with the same boxes."""
        if self.read_only:  # Orbax would skip it with a log line: a lost save must not be quiet
            raise RuntimeError(f"cannot save step {step}: {self.directory} was opened read-only")
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
                f"{num_examples} training examples ({cli.first_line(error)}); train on the data "
                f"the run started with, or use a new --workdir") from error
        return np.asarray(restored.boxes["boxes"])

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any] | None:
        """Restore the newest readable step onto the shardings of `abstract_state`.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` set: Orbax then
        reads every array straight into the current device layout. A step that fails to read is
        reported and skipped in favour of the one before it.
        """
        return self._restore_newest(lambda step: abstract_state)

    def restore_latest_as_saved(self, sharding: jax.sharding.Sharding) -> tuple[int, Any] | None:
        """Restore the newest readable step with the shapes and dtypes it was saved with, every
        array on `sharding`: for readers that do not rebuild the model (convert). A step whose
        metadata or arrays cannot be read is skipped as in `restore_latest`."""

        def saved_layout(step: int) -> Any:
            state_dir = self.directory / str(step) / "state"
            metadata = ocp.StandardCheckpointHandler().metadata(state_dir)
            return jax.tree.map(
                lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                metadata.tree)

        return self._restore_newest(saved_layout)

    def _restore_newest(self, target_of_step: Callable[[int], Any]) -> tuple[int, Any] | None:
        for step in reversed(self.all_steps()):
            target = None
            try:
                target = target_of_step(step)
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target)))
            except Exception as error:  # noqa: BLE001 - any damaged file: fall back, say why
                # Another model only when the step's own metadata is intact and describes other
                # arrays; a torn step (missing or truncated files) is never mistaken for one.
                if target is not None and _saved_arrays_differ(
                        self.directory / str(step) / "state", target):
                    raise IncompatibleCheckpointError(
                        f"the checkpoint in {self.directory} (step {step}) does not match the "
                        f"configured model; use a new --workdir or the config it was trained with"
                    ) from error
                _LOG.warning("checkpoint step %d is unreadable (%s); trying the previous one",
                             step, cli.first_line(error))
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


# ---------------------------------------------------------------------------------------------
# The two ways into a run's checkpoints: its own trainer (writable) and readers (read-only).
# ---------------------------------------------------------------------------------------------
def restore_or_init(make_state: Callable[[], Any], abstract_state: Any, shardings: Any,
                    checkpointer: Checkpointer) -> tuple[Any, bool]:
    """(state, resumed): the newest readable checkpoint, or a jitted init straight into
    `shardings`. Pretraining and the linear probe resume this way."""
    restored = checkpointer.restore_latest(abstract_with_shardings(abstract_state, shardings))
    if restored is None and checkpointer.all_steps():
        # Never start afresh over checkpoints it cannot read: its saves would be refused or
        # would replace them.
        raise ValueError(f"none of the checkpoints {checkpointer.all_steps()} in "
                         f"{checkpointer.directory} could be read (see the warnings above); "
                         f"move them away or use a new --workdir")
    if restored is None:
        _LOG.info("initialising a new state in %s", checkpointer.directory)
        return jax.jit(make_state, out_shardings=shardings)(), False
    step, state = restored
    print(f"resumed from the checkpoint of step {step} in {checkpointer.directory}", flush=True)
    return state, True


def read_newest(workdir: str, target: Any, alternative: str = "") -> tuple[int, Any, dict]:
    """(step, state, config) of the newest readable checkpoint of a run, opened read-only: how
    every reader restores (kNN, linear probe, pictures, convert).

    `target` is the abstract state with shardings (see `abstract_with_shardings`), or one
    Sharding to restore every array with the shape and dtype it was saved with. `alternative`
    ends the no-checkpoint error with what else the caller can do.
    """
    directory = workdir_path(workdir) / "checkpoints"
    # Checked first, for a message that says what to do.
    if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
        raise ValueError(f"no checkpoint in {directory}: pretrain first (python -m bam_jax.main "
                         f"--workdir={workdir} ...){alternative}")
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        restored = (checkpointer.restore_latest_as_saved(target)
                    if isinstance(target, jax.sharding.Sharding)
                    else checkpointer.restore_latest(target))
        if restored is None:
            raise ValueError(f"none of the checkpoints {checkpointer.all_steps()} in "
                             f"{directory} could be read (see the warnings above); rerun the "
                             f"pretraining to write a new one")
        step, state = restored
        return step, state, checkpointer.restore_config(step)
    finally:
        checkpointer.close()


def read_boxes(workdir: str, step: int, num_examples: int) -> np.ndarray | None:
    """The ContrastiveCrop box table saved with `step` of a run, or None."""
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        return checkpointer.restore_boxes(step, num_examples)
    finally:
        checkpointer.close()


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """config.json in the workdir (process 0), read back by the evaluation entry points."""
    if jax.process_index() == 0:
        (workdir_path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config that `save_config` wrote to DIR/config.json (gs:// too)."""
    path = workdir_path(workdir) / "config.json"
    if not path.exists():
        raise ValueError(f"{path} does not exist: {workdir!r} is not a bam_jax pretraining "
                         f"workdir; pass the --workdir given to `python -m bam_jax.main`")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


# ---------------------------------------------------------------------------------------------
# The workdir lease: one run at a time writes a workdir.
# ---------------------------------------------------------------------------------------------
class WorkdirInUseError(ValueError):
    """Another live run holds the workdir's lease."""


class WorkdirLock:
    """The lease `workdir/LOCK` that makes a run the only writer of its workdir.

    Without it a second run on the same workdir resumes the first one's checkpoint, deletes its
    save in flight as a crash leftover and interleaves config.json and metrics.jsonl. The lease
    names its holder (host, pid, start) and carries a heartbeat that a background thread
    refreshes every `heartbeat_seconds`. A lease is taken over, with a warning, when its holder is
    provably dead (same host and pid namespace, and the pid is gone, a zombie, or the host has
    rebooted since) or its heartbeat is older than `stale_after_seconds` (default 10 heartbeats:
    a holder on another host, host clocks in sync); any other lease makes `acquire` raise
    `WorkdirInUseError`, one line naming the holder.

    Only `process_index` 0 takes the lease: the processes of one multi-process run share the
    workdir. Local and network disks: the lease appears with its content in one `os.link`, so
    of two runs started at once exactly one wins. Buckets (gs://) have no atomic
    create-if-absent through epath: a run writes its lease, waits `_BUCKET_SETTLE_SECONDS` and
    reads it back, which separates runs whose writes are that far apart; what always remains is
    the heartbeat (a run is refused while another keeps its lease fresh) and the holder's own
    check that its lease is still its own (`ensure_held`).
    """

    def __init__(self, workdir: str, *, process_index: int, heartbeat_seconds: float = 15.0,
                 stale_after_seconds: float | None = None):
        self.path = workdir_path(workdir) / "LOCK"
        self._takes_lease = process_index == 0
        self._local = "://" not in str(self.path)
        self._heartbeat_seconds = heartbeat_seconds
        self._stale_after = stale_after_seconds or 10 * heartbeat_seconds
        self._token = uuid.uuid4().hex
        self._started = time.time()
        self._stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._lost_to: str | None = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease (creating the workdir), or raise WorkdirInUseError."""
        if not self._takes_lease:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_ACQUIRE_ATTEMPTS):
            if self._create():
                self._heartbeat_thread = threading.Thread(
                    target=self._beat, name="bam_jax-workdir-lease", daemon=True)
                self._heartbeat_thread.start()
                return
            try:
                text = self.path.read_text()
            except FileNotFoundError:  # released meanwhile
                continue
            reason = self._stale_reason(text)
            if reason is None:
                raise WorkdirInUseError(self._in_use_message(text))
            _LOG.warning("taking over the lease %s: %s", self.path, reason)
            self._remove_if_unchanged(text)
        raise WorkdirInUseError(f"{self.path} kept changing hands while this run tried to take "
                                f"it: another run is starting in {self.path.parent}")

    def ensure_held(self) -> None:
        """Raise WorkdirInUseError when the heartbeat found the lease taken by another run
        (after this one stalled past the timeout, or on a bucket): call before writing."""
        if self._lost_to is not None:
            raise WorkdirInUseError(f"{self.path.parent} was taken over by another run "
                                    f"({self._lost_to}); stopped without writing to it")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this run's."""
        if self._heartbeat_thread is None:
            return
        self._stop.set()
        self._heartbeat_thread.join()
        self._heartbeat_thread = None
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        if _lease_field(text, "token") == self._token:
            self.path.unlink(missing_ok=True)
        else:
            _LOG.warning("%s is no longer this run's lease; left as it is", self.path)

    # -- the lease file ------------------------------------------------------------------------
    def _lease_text(self) -> str:
        return json.dumps(dict(_this_machine(), pid=os.getpid(), started=self._started,
                               heartbeat=time.time(), token=self._token))

    def _create(self) -> bool:
        """Create the lease if there is none; whether this run now holds it."""
        if not self._local:
            if self.path.exists():
                return False
            self.path.write_text(self._lease_text())
            time.sleep(_BUCKET_SETTLE_SECONDS)  # a run that wrote at the same time shows now
            return _lease_field(self.path.read_text(), "token") == self._token
        staged = self.path.with_name(f".LOCK.{self._token}")
        staged.write_text(self._lease_text())
        try:
            os.link(staged, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some FUSE mounts): exclusive create, then write
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "w") as lease:
                lease.write(self._lease_text())
            return True
        finally:
            staged.unlink(missing_ok=True)

    def _remove_if_unchanged(self, text: str) -> None:
        """Remove a stale lease unless it changed since it was judged (another run took it)."""
        if not self._local:
            if self.path.read_text() == text:
                self.path.unlink(missing_ok=True)
            return
        moved = self.path.with_name(f".LOCK.{self._token}.stale")
        try:
            os.rename(self.path, moved)  # atomic: of two runs taking it over, one moves it
        except FileNotFoundError:
            return
        if moved.read_text() != text:  # a fresh lease, not the stale one: put it back
            try:
                os.link(moved, self.path)
            except OSError:
                pass
        moved.unlink()

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_seconds):
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                text = ""
            if _lease_field(text, "token") != self._token:
                self._lost_to = _holder(text) if text else "its lease was deleted"
                _LOG.error("%s is no longer this run's lease (%s)", self.path, self._lost_to)
                return
            try:
                if self._local:  # readers never see a half-written lease
                    staged = self.path.with_name(f".LOCK.{self._token}")
                    staged.write_text(self._lease_text())
                    os.replace(staged, self.path)
                else:
                    self.path.write_text(self._lease_text())
            except OSError as error:  # a full disk or a network blip: the next beat retries
                _LOG.warning("could not refresh %s: %s", self.path, cli.first_line(error))

    # -- judging another run's lease -----------------------------------------------------------
    def _stale_reason(self, text: str) -> str | None:
        """Why the lease in `text` may be taken over, or None when its holder may be alive."""
        try:
            lease = json.loads(text)
            heartbeat = float(lease["heartbeat"])
        except (ValueError, KeyError, TypeError):
            lease, heartbeat = None, self._modified_time()
        if lease is not None and _dead_on_this_machine(lease):
            return f"its holder, pid {lease.get('pid')} on this host, is no longer running"
        age = time.time() - heartbeat
        if age > self._stale_after:
            return f"its holder ({_holder(text)}) has not renewed it for {age:.0f} s"
        return None

    def _modified_time(self) -> float:
        """When an unreadable lease (a run mid-write, a damaged file) was last written."""
        try:
            return float(self.path.stat().mtime)
        except FileNotFoundError:
            return 0.0

    def _in_use_message(self, text: str) -> str:
        try:
            heartbeat = float(json.loads(text)["heartbeat"])
        except (ValueError, KeyError, TypeError):
            heartbeat = self._modified_time()
        return (f"{self.path.parent} is in use by another run ({_holder(text)}, last heartbeat "
                f"{time.time() - heartbeat:.0f} s ago); wait for it to finish, stop it, or "
                f"delete {self.path} if you are sure it is dead")


_ACQUIRE_ATTEMPTS = 5
_BUCKET_SETTLE_SECONDS = 2.0


def _lease_field(text: str, name: str) -> Any:
    try:
        return json.loads(text).get(name)
    except (ValueError, AttributeError):
        return None


def _holder(text: str) -> str:
    """'pid 123 on host-a since 2025-01-02 03:04:05', or what can be said of a damaged lease."""
    try:
        lease = json.loads(text)
        started = datetime.datetime.fromtimestamp(float(lease["started"]))
        return f"pid {lease['pid']} on {lease['host']} since {started:%Y-%m-%d %H:%M:%S}"
    except (ValueError, KeyError, TypeError, OverflowError, OSError):
        return "holder unknown: the lease cannot be read"


def _this_machine() -> dict[str, str]:
    """Host name, boot and pid namespace: a pid means the same process only where all three
    agree (containers on one host share its name but not its pids)."""

    def read(path: str, link: bool = False) -> str:
        try:
            if link:
                return os.readlink(path)
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""

    return {"host": socket.gethostname(), "boot_id": read("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": read("/proc/self/ns/pid", link=True)}


def _dead_on_this_machine(lease: dict) -> bool:
    machine = _this_machine()
    if any(lease.get(key) != machine[key] for key in ("host", "pid_namespace")):
        return False
    if lease.get("boot_id") != machine["boot_id"]:
        return True  # this host rebooted since the lease was written
    return not _pid_running(int(lease.get("pid", -1)))


def _pid_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a killed process its parent has not reaped yet is a zombie: dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True
