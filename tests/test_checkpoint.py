"""checkpoint.py: read-only readers of a run, the workdir lease, and refused retention settings."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest

from bam_jax import checkpoint as checkpoint_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)}
BOXES = np.tile(np.array([[0.1, 0.2, 0.9, 0.8]], np.float32), (5, 1))


def _tree(root):
    """Every path under `root` with its size and mtime: any write, creation or deletion shows."""
    listing = {".": os.lstat(root).st_mtime_ns}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            status = os.lstat(path)
            listing[os.path.relpath(path, root)] = (status.st_size, status.st_mtime_ns)
    return listing


def _abstract(state):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


@pytest.fixture
def workdir_with_save_in_flight(tmp_path):
    """Step 2 finalized, step 4 half-written by a trainer that is still running."""
    workdir = str(tmp_path / "run")
    writer = checkpoint_lib.Checkpointer(workdir, async_save=False)
    writer.save(2, STATE, ml_collections.ConfigDict({"seed": 7}), boxes=BOXES)
    writer.close()
    in_flight = os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp-1733000000")
    os.makedirs(os.path.join(in_flight, "state", "d"))
    with open(os.path.join(in_flight, "state", "d", "0123abcd"), "wb") as f:
        f.write(os.urandom(1000))
    return workdir, in_flight


def _read_everything(workdir):
    reader = checkpoint_lib.Checkpointer(workdir, read_only=True)
    try:
        assert reader.all_steps() == [2]
        step, state = reader.restore_latest(_abstract(STATE))
        config = reader.restore_config(step)
        boxes = reader.restore_boxes(step, len(BOXES))
        as_saved_step, as_saved = reader.restore_latest_as_saved(
            jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    finally:
        reader.close()
    assert step == as_saved_step == 2 and config == {"seed": 7}
    np.testing.assert_array_equal(np.asarray(state["w"]), STATE["w"])
    np.testing.assert_array_equal(np.asarray(as_saved["b"]), STATE["b"])
    np.testing.assert_array_equal(boxes, BOXES)


def test_reader_leaves_the_trainers_save_in_flight_alone(workdir_with_save_in_flight):
    workdir, in_flight = workdir_with_save_in_flight
    before = _tree(workdir)
    _read_everything(workdir)
    assert _tree(workdir) == before
    # What the readers did before: the writable manager deletes the save in flight as a
    # leftover of a crash, and the trainer dies on its missing directory.
    checkpoint_lib.Checkpointer(workdir, async_save=False).close()
    deadline = time.time() + 30  # Orbax deletes it in the background
    while os.path.exists(in_flight) and time.time() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(in_flight)


def test_reader_of_a_read_only_copy_writes_nothing(workdir_with_save_in_flight, tmp_path,
                                                   monkeypatch):
    """Tests run as root, whom mode bits do not stop: that nothing is attempted is checked by
    recording every file-system change Python makes under the copy, besides the listing."""
    source, _ = workdir_with_save_in_flight
    copy = str(tmp_path / "read_only_copy")
    shutil.copytree(source, copy)
    for folder, dirs, files in os.walk(copy):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
        os.chmod(folder, 0o555)
    before = _tree(copy)
    attempts = []
    for name in ("mkdir", "makedirs", "rmdir", "remove", "unlink", "rename", "replace", "link"):
        original = getattr(os, name)

        def record(path, *args, _original=original, _name=name, **kwargs):
            if os.fspath(path).startswith(copy):
                attempts.append((_name, os.fspath(path)))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(os, name, record)
    try:
        _read_everything(copy)
    finally:
        monkeypatch.undo()
        for folder, _, _ in os.walk(copy):
            os.chmod(folder, 0o755)
    assert attempts == []
    assert _tree(copy) == before


def test_reader_of_a_missing_workdir_creates_nothing(tmp_path):
    reader = checkpoint_lib.Checkpointer(str(tmp_path / "absent"), read_only=True)
    assert reader.latest_step() is None and reader.restore_latest(_abstract(STATE)) is None
    reader.close()
    assert os.listdir(tmp_path) == []


def test_read_only_checkpointer_refuses_to_save(workdir_with_save_in_flight):
    workdir, _ = workdir_with_save_in_flight
    reader = checkpoint_lib.Checkpointer(workdir, read_only=True)
    with pytest.raises(RuntimeError, match="read-only"):
        reader.save(6, STATE, ml_collections.ConfigDict({"seed": 7}))
    reader.close()


@pytest.mark.parametrize("keep", [0, -1])
def test_keeping_no_checkpoint_is_refused_and_deletes_nothing(workdir_with_save_in_flight, keep):
    workdir, _ = workdir_with_save_in_flight
    before = _tree(workdir)
    with pytest.raises(ValueError, match=rf"^config\.keep_checkpoints={keep}: keep at least 1"):
        checkpoint_lib.Checkpointer(workdir, max_to_keep=keep)
    assert _tree(workdir) == before


# ---------------------------------------------------------------------------------------------
# WorkdirLock.
# ---------------------------------------------------------------------------------------------
def _write_lease(workdir, *, pid, host=None, heartbeat_age=0.0, **fields):
    machine = checkpoint_lib._this_machine()
    lease = dict(machine, pid=pid, started=time.time() - 3600,
                 heartbeat=time.time() - heartbeat_age, token="someone-else", **fields)
    if host is not None:
        lease["host"] = host
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "LOCK"), "w") as f:
        json.dump(lease, f)


def _lease(workdir):
    with open(os.path.join(workdir, "LOCK")) as f:
        return json.load(f)


def _finished_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    workdir = str(tmp_path / "w")
    with checkpoint_lib.WorkdirLock(workdir, process_index=0):
        lease = _lease(workdir)
        assert lease["pid"] == os.getpid() and lease["host"] == socket.gethostname()
        with pytest.raises(checkpoint_lib.WorkdirInUseError) as refused:
            checkpoint_lib.WorkdirLock(workdir, process_index=0).acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert os.path.join(workdir, "LOCK") in message and "if you are sure it is dead" in message
    assert not os.path.exists(os.path.join(workdir, "LOCK"))


def test_lease_of_a_dead_process_is_taken_over(tmp_path, caplog):
    workdir = str(tmp_path / "w")
    dead = _finished_pid()
    _write_lease(workdir, pid=dead)
    with checkpoint_lib.WorkdirLock(workdir, process_index=0):
        assert _lease(workdir)["pid"] == os.getpid()
    assert f"pid {dead} on this host, is no longer running" in caplog.text


def test_lease_of_a_killed_unreaped_process_is_taken_over(tmp_path):
    """A run killed with SIGKILL stays a zombie until its parent reaps it: it is dead."""
    workdir = str(tmp_path / "w")
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while checkpoint_lib._pid_running(zombie.pid) and time.time() < deadline:
        time.sleep(0.05)
    _write_lease(workdir, pid=zombie.pid)
    with checkpoint_lib.WorkdirLock(workdir, process_index=0):
        assert _lease(workdir)["pid"] == os.getpid()
    zombie.wait()


def test_live_lease_of_another_host_is_refused_and_a_stale_one_taken_over(tmp_path, caplog):
    workdir = str(tmp_path / "w")
    _write_lease(workdir, pid=4242, host="node-17", heartbeat_age=5)
    with pytest.raises(checkpoint_lib.WorkdirInUseError, match="pid 4242 on node-17 since"):
        checkpoint_lib.WorkdirLock(workdir, process_index=0, heartbeat_seconds=10).acquire()
    _write_lease(workdir, pid=4242, host="node-17", heartbeat_age=101)
    with checkpoint_lib.WorkdirLock(workdir, process_index=0, heartbeat_seconds=10):
        assert _lease(workdir)["pid"] == os.getpid()
    assert "(pid 4242 on node-17" in caplog.text and "has not renewed it for 101 s" in caplog.text


def test_live_pid_of_this_host_with_a_stale_heartbeat_is_taken_over(tmp_path):
    """A reused pid (or a holder frozen past the timeout) does not hold the workdir forever."""
    workdir = str(tmp_path / "w")
    _write_lease(workdir, pid=os.getppid(), heartbeat_age=1000)
    with checkpoint_lib.WorkdirLock(workdir, process_index=0):
        assert _lease(workdir)["pid"] == os.getpid()


def test_unreadable_lease_is_judged_by_its_modification_time(tmp_path):
    workdir = str(tmp_path / "w")
    os.makedirs(workdir)
    lock = os.path.join(workdir, "LOCK")
    with open(lock, "w") as f:
        f.write('{"host": "no')
    with pytest.raises(checkpoint_lib.WorkdirInUseError, match="the lease cannot be read"):
        checkpoint_lib.WorkdirLock(workdir, process_index=0).acquire()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    with checkpoint_lib.WorkdirLock(workdir, process_index=0):
        assert _lease(workdir)["pid"] == os.getpid()


def test_release_removes_only_its_own_lease(tmp_path, caplog):
    workdir = str(tmp_path / "w")
    lock = checkpoint_lib.WorkdirLock(workdir, process_index=0)
    lock.acquire()
    _write_lease(workdir, pid=4242, host="node-17")  # another run took it over meanwhile
    lock.release()
    assert _lease(workdir)["token"] == "someone-else"
    assert "no longer this run's lease; left as it is" in caplog.text


def test_heartbeat_refreshes_the_lease_and_notices_a_takeover(tmp_path):
    workdir = str(tmp_path / "w")
    with checkpoint_lib.WorkdirLock(workdir, process_index=0, heartbeat_seconds=0.05) as lock:
        first = _lease(workdir)["heartbeat"]
        deadline = time.time() + 30
        while _lease(workdir)["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert _lease(workdir)["heartbeat"] > first
        lock.ensure_held()
        assert not [n for n in os.listdir(workdir) if n != "LOCK"]  # no staged files left
        _write_lease(workdir, pid=4242, host="node-17")
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                lock.ensure_held()
            except checkpoint_lib.WorkdirInUseError as error:
                assert "taken over by another run (pid 4242 on node-17" in str(error)
                break
            time.sleep(0.02)
        else:
            pytest.fail("the heartbeat did not notice the takeover")
    assert _lease(workdir)["token"] == "someone-else"


def test_only_process_0_takes_the_lease(tmp_path):
    workdir = str(tmp_path / "w")
    _write_lease(workdir, pid=4242, host="node-17")
    with checkpoint_lib.WorkdirLock(workdir, process_index=1):
        assert _lease(workdir)["token"] == "someone-else"
    assert _lease(workdir)["token"] == "someone-else"


def test_bucket_lease_without_atomic_create(tmp_path, monkeypatch):
    """The gs:// path (exists, write, settle, read back), exercised on a local folder."""
    monkeypatch.setattr(checkpoint_lib, "_BUCKET_SETTLE_SECONDS", 0.01)
    workdir = str(tmp_path / "w")

    def bucket_lock():
        lock = checkpoint_lib.WorkdirLock(workdir, process_index=0)
        lock._local = False
        return lock

    with bucket_lock():
        with pytest.raises(checkpoint_lib.WorkdirInUseError, match=f"pid {os.getpid()}"):
            bucket_lock().acquire()
    assert not os.path.exists(os.path.join(workdir, "LOCK"))
    _write_lease(workdir, pid=4242, host="node-17", heartbeat_age=1000)
    with bucket_lock():
        assert _lease(workdir)["pid"] == os.getpid()


RACER = textwrap.dedent('''
    import os, sys, time
    from bam_jax import checkpoint
    base, name, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    open(os.path.join(base, "ready." + name), "w").close()
    go = os.path.join(base, "go")
    while not os.path.exists(go):
        time.sleep(0.001)
    start = float(open(go).read())
    for r in range(rounds):
        while time.time() < start + r:  # both racers try each round at the same instant
            pass
        lock = checkpoint.WorkdirLock(os.path.join(base, f"w{r}"), process_index=0)
        try:
            lock.acquire()
        except checkpoint.WorkdirInUseError:
            print(r, "lost", flush=True)
            continue
        print(r, "won", flush=True)
        time.sleep(max(start + r + 0.7 - time.time(), 0))  # held while the other one tries
        lock.release()
''')


@pytest.mark.slow
def test_two_processes_racing_for_a_workdir_exactly_one_wins(tmp_path):
    rounds = 3
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO,
                                                               os.environ.get("PYTHONPATH")])))
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), name, str(rounds)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for name in ("a", "b")]
    deadline = time.time() + 240
    while not all(os.path.exists(tmp_path / f"ready.{n}") for n in "ab"):
        assert time.time() < deadline and all(r.poll() is None for r in racers), \
            [r.communicate() for r in racers]
        time.sleep(0.05)
    # Written whole, then renamed: a racer that sees "go" never reads it half-written.
    (tmp_path / "go.tmp").write_text(str(time.time() + 0.5))
    os.replace(tmp_path / "go.tmp", tmp_path / "go")
    outputs = [r.communicate(timeout=120) for r in racers]
    assert all(r.returncode == 0 for r in racers), outputs
    results = [dict(line.split() for line in out.splitlines()) for out, _ in outputs]
    for r in range(rounds):
        assert sorted(result[str(r)] for result in results) == ["lost", "won"], (r, outputs)
        assert not os.path.exists(tmp_path / f"w{r}" / "LOCK")
