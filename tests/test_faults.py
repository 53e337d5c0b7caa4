"""Faults and bad input, each an automated test (the table is docs/faults.md).

The SIGKILL test runs `python -m bam_jax.main` in a subprocess; the rest calls the same
`bam_jax.main.main` (or `train.train_and_evaluate`) in-process, with real signals sent to this
process, to spare the ~10 s of imports per case. Every run is the tiny ConvNet of conftest's
`tiny_config_file`: 8 steps of 32 MNIST digits, checkpoints every 2 steps, asynchronous saves.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
import tensorflow as tf

from bam_jax import checkpoint as checkpoint_lib
from bam_jax import sharding, train
from bam_jax.data import pipeline
from bam_jax.evals import linear_probe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8


class Run:
    """`python -m bam_jax.main` in the background, stdout and stderr to files in `log_dir`."""

    def __init__(self, env, config_file, workdir, log_dir, name, *overrides):
        self.out, self.err = (os.path.join(log_dir, f"{name}.{s}") for s in ("out", "err"))
        self.workdir = workdir
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bam_jax.main", f"--config={config_file}",
                 f"--workdir={workdir}", *overrides], cwd=REPO, env=env, stdout=out,
                stderr=err)

    def stdout(self):
        with open(self.out) as f:
            return f.read()

    def stderr(self):
        with open(self.err) as f:
            return f.read()

    def wait_for(self, condition, timeout=240):
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"exited early:\n{self.stdout()}\n{self.stderr()}"
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.005)

    def finish(self, timeout=300):
        self.proc.wait(timeout=timeout)
        return self.proc.returncode


def _tmp_dirs(workdir):
    return glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*"))


def _signal_at_step(signum, at_step):
    """An `_agreed_stop` that sends `signum` to this process after step `at_step`."""
    agreed_stop = train._agreed_stop

    def stop(requested, step, every):
        if step == at_step:
            os.kill(os.getpid(), signum)  # handled here: the next step sees it
        return agreed_stop(requested, step, every)

    return stop


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_config_file, read_metrics, main_in_process, subprocess_env):
    """An uninterrupted run, and the same command SIGKILLed mid-save, SIGTERMed, rerun."""
    root = tmp_path_factory.mktemp("chain")
    logs = str(root)
    full, killed = str(root / "full"), str(root / "killed")
    reference = main_in_process(tiny_config_file, full)
    assert reference[0] == 0, reference[2]
    # 1. SIGKILL while the asynchronous save of step 4 is being written: its tmp dir exists.
    first = Run(subprocess_env(), tiny_config_file, killed, logs, "kill")
    first.wait_for(lambda: any("/4." in p for p in _tmp_dirs(killed))
                   or 5 in read_metrics_safe(read_metrics, killed))
    first.proc.send_signal(signal.SIGKILL)
    first.finish()
    after_kill = {"tmp": _tmp_dirs(killed), "steps": _steps(killed),
                  "metrics": sorted(read_metrics_safe(read_metrics, killed))}
    # 2. The same command resumes (in this process); a real SIGTERM after step 5.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "_agreed_stop", _signal_at_step(signal.SIGTERM, 5))
        term_rc, term_out, term_err = main_in_process(tiny_config_file, killed)
    after_term = {"steps": _steps(killed), "metrics": sorted(read_metrics_safe(read_metrics,
                                                                               killed)),
                  "stdout": term_out, "stderr": term_err}
    # 3. The same command again finishes the run.
    finish_rc, finish_out, finish_err = main_in_process(tiny_config_file, killed)
    return types.SimpleNamespace(
        full=full, killed=killed, after_kill=after_kill, term_rc=term_rc, after_term=after_term,
        finish_rc=finish_rc, finish_out=finish_out, finish_err=finish_err)


def _steps(workdir):
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    return sorted(int(n) for n in names if n.isdigit())


def read_metrics_safe(read_metrics, workdir):
    try:
        return read_metrics(workdir)
    except (OSError, json.JSONDecodeError):
        return {}


@pytest.mark.slow
def test_sigkill_mid_save_resumes_bitwise(chain, read_state, assert_trees_close):
    # Killed right after step 4 logged, while its save was in flight: no step 4 was committed
    # (or, if the write won the race, it is complete); the rerun starts from the last complete one.
    resumed = [l for l in chain.after_term["stdout"].splitlines() if l.startswith("resumed from")]
    assert resumed, chain.after_term["stdout"]
    resumed_step = int(resumed[0].split("step ")[1].split()[0])
    assert resumed_step == max(chain.after_kill["steps"]) in (2, 4)
    assert chain.finish_rc == 0, chain.finish_err
    assert _steps(chain.full) == [4, 6, 8]
    # The SIGTERM after step 5 stops the run at the next step, 6, and saves it.
    assert _steps(chain.killed) == [4, 6, 8]
    assert not _tmp_dirs(chain.killed)
    # Same device count on CPU: the final state is bitwise that of the uninterrupted run.
    assert_trees_close(read_state(chain.full, 8), read_state(chain.killed, 8), rtol=0, atol=0)


@pytest.mark.slow
def test_resumed_losses_equal_the_uninterrupted_run(chain, read_metrics):
    full = read_metrics(chain.full)
    with open(os.path.join(chain.killed, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]
    assert sorted({r["step"] for r in rows}) == list(range(1, STEPS + 1))
    for row in rows:  # steps logged twice (done again after the kill) agree too
        assert row["loss"] == full[row["step"]]["loss"], row["step"]


@pytest.mark.slow
def test_sigterm_saves_the_last_step_and_exits_cleanly(chain):
    assert chain.term_rc == 0, chain.after_term["stderr"]
    last_done = max(chain.after_term["metrics"])
    assert last_done == 6  # the step after the one the signal arrived in
    assert f"SIGTERM: saved step {last_done} and stopped; rerun the same command to resume" \
        in chain.after_term["stdout"]
    assert max(chain.after_term["steps"]) == last_done
    assert "Traceback" not in chain.after_term["stderr"]
    assert f"resumed from the checkpoint of step {last_done}" in chain.finish_out


def test_sigterm_during_compilation_exits_cleanly(tmp_path, run_main, tiny_config_file, chain,
                                                  monkeypatch, resume_from, read_state,
                                                  assert_trees_close):
    workdir = str(tmp_path / "w")
    resume_from(chain.full, workdir, step=4)
    create = pipeline.create_pretrain_dataset

    def sigterm_then_create(*args, **kwargs):  # after the restore, before the compilation
        os.kill(os.getpid(), signal.SIGTERM)
        return create(*args, **kwargs)

    monkeypatch.setattr(pipeline, "create_pretrain_dataset", sigterm_then_create)
    code, out, err = run_main(tiny_config_file, workdir)
    assert code == 0, err
    assert "resumed from the checkpoint of step 4" in out
    assert "SIGTERM before the first step: nothing new to save (the last checkpoint is step 4)" \
        in out
    assert _steps(workdir) == [4] and not _tmp_dirs(workdir)
    assert_trees_close(read_state(chain.full, 4), read_state(workdir, 4), rtol=0, atol=0)


def test_a_second_sigint_interrupts_at_once():
    # Two signals that arrive before Python runs the handler coalesce into one, so the second
    # Ctrl-C is tested here, in this process, and its effect on a run below.
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under a shell's background job
    with train.StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # the handler it found is back


# ---------------------------------------------------------------------------------------------
# In-process runs of bam_jax.main.main.


def assert_one_error_line(err, expected):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("bam_jax: error: "), err
    assert expected in lines[0], lines[0]


def test_torn_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, chain, run_main,
                                                        tiny_config_file, resume_from, read_state,
                                                        assert_trees_close, damage_checkpoint):
    workdir = str(tmp_path / "w")
    resume_from(chain.full, workdir, step=6)
    damage_checkpoint(os.path.join(workdir, "checkpoints", "6"))
    half = os.path.join(workdir, "checkpoints", "8.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(half, "state"))
    with open(os.path.join(half, "state", "_METADATA"), "w") as f:
        f.write('{"tree_metadata": {')
    code, out, _ = run_main(tiny_config_file, workdir)
    assert code == 0
    assert "checkpoint step 6 is unreadable" in caplog.text
    assert "resumed from the checkpoint of step 4" in out
    assert not os.path.exists(half)
    # It redid steps 5..8 from step 4: bitwise the uninterrupted run.
    assert_trees_close(read_state(chain.full, 8), read_state(workdir, 8), rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["overwrite_data", "empty_step_dir", "no_state_item",
                                    "truncated_metadata"])
def test_damaged_newest_step_is_never_taken(tmp_path, chain, damage, resume_from, read_state,
                                            tiny_config):
    workdir = str(tmp_path / "w")
    resume_from(chain.full, workdir, step=6)
    step_dir = os.path.join(workdir, "checkpoints", "6")
    if damage == "overwrite_data":
        for path in glob.glob(os.path.join(step_dir, "state", "d", "*")):
            with open(path, "r+b") as f:
                f.seek(os.path.getsize(path) // 4)
                f.write(os.urandom(512))
    elif damage == "empty_step_dir":  # e.g. an object store listing a step before its files
        shutil.rmtree(step_dir)
        os.makedirs(step_dir)
    elif damage == "no_state_item":
        shutil.rmtree(os.path.join(step_dir, "state"))
    else:
        with open(os.path.join(step_dir, "state", "_METADATA"), "r+b") as f:
            f.truncate(100)
    config = tiny_config(backbone="convnet", teacher=False)
    abstract = _abstract_state(config)
    checkpointer = checkpoint_lib.Checkpointer(workdir, async_save=False)
    try:
        step, state = checkpointer.restore_latest(abstract)
    finally:
        checkpointer.close()
    assert step == 4
    def arrays(tree):  # nnx.State and the plain dict of read_state flatten in different orders
        return sorted((x.shape, np.asarray(x).tobytes()) for x in jax.tree.leaves(tree))
    assert arrays(jax.device_get(state.params)) == arrays(read_state(chain.full, 4)["params"])


def _abstract_state(config):
    mesh = sharding.make_mesh(config)
    optimizer = train.make_optimizer(config)
    create = train.run_model_factory(config)
    abstract = jax.eval_shape(lambda: train.init_state(create, optimizer, config.teacher.enabled))
    shardings = sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
    return checkpoint_lib.abstract_with_shardings(abstract, shardings)


def test_all_checkpoints_unreadable_is_refused(tmp_path, chain, run_main, tiny_config_file,
                                               resume_from, damage_checkpoint):
    workdir = str(tmp_path / "w")
    resume_from(chain.full, workdir, step=6)
    for step in (4, 6):
        damage_checkpoint(os.path.join(workdir, "checkpoints", str(step)))
    code, _, err = run_main(tiny_config_file, workdir)
    assert code == 2
    assert_one_error_line(err, "none of the checkpoints [4, 6] in")
    assert _steps(workdir) == [4, 6]  # nothing started afresh over them


def test_device_count_changes_8_to_4_to_1(tmp_path, chain, run_main, tiny_config_file, resume_from,
                                          read_state, assert_trees_close, read_metrics):
    on4 = str(tmp_path / "on4")
    resume_from(chain.full, on4, step=4)  # saved on 8 devices
    code, out, _ = run_main(tiny_config_file, on4, "--config.mesh.num_devices=4")
    assert code == 0 and "resumed from the checkpoint of step 4" in out
    on1 = str(tmp_path / "on1")
    resume_from(on4, on1, step=6)  # saved on 4 devices
    code, out, _ = run_main(tiny_config_file, on1, "--config.mesh.num_devices=1")
    assert code == 0 and "resumed from the checkpoint of step 6" in out
    # Another device count sums the batch in another order: equal up to float32 reassociation.
    for workdir in (on4, on1):
        assert_trees_close(read_state(chain.full, 8)["params"], read_state(workdir, 8)["params"],
                           rtol=1e-3, atol=2e-5)
    full, resumed = read_metrics(chain.full), read_metrics(on1)
    for step in range(5, STEPS + 1):
        np.testing.assert_allclose(resumed[step]["loss"], full[step]["loss"], rtol=1e-4)


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, chain, run_main, tiny_config_file,
                                                      resume_from, read_state, assert_trees_close,
                                                      read_metrics):
    workdir = str(tmp_path / "w")
    resume_from(chain.full, workdir, step=4)
    code, _, err = run_main(tiny_config_file, workdir, "--config.optimizer.base_lr=nan",
                            "--config.allow_changed_fields=optimizer.base_lr")
    assert code == 2
    assert_one_error_line(err, "non-finite loss or gradient by step 5 (loss ")
    assert "the last good checkpoint is step 4. Lower the learning rate" in err
    assert "--config.skip_nonfinite_steps=True to skip such steps" in err
    assert _steps(workdir) == [4]
    assert_trees_close(read_state(chain.full, 4), read_state(workdir, 4), rtol=0, atol=0)
    assert max(read_metrics(workdir)) == 4  # the metrics written before stay; no NaN row


def test_nan_steps_are_skipped_when_asked(tmp_path, chain, run_main, tiny_config_file, resume_from,
                                          read_state, assert_trees_close):
    workdir = str(tmp_path / "w")
    resume_from(chain.full, workdir, step=4)
    code, out, _ = run_main(tiny_config_file, workdir, "--config.optimizer.base_lr=nan",
                            "--config.skip_nonfinite_steps=True",
                            "--config.allow_changed_fields=optimizer.base_lr")
    assert code == 0 and "done: step 8" in out
    state, good = read_state(workdir, 8), read_state(chain.full, 4)
    assert int(state["nonfinite_steps"]) == 4 and int(state["step"]) == 8
    # No NaN reached the state: every skipped step left it as it was.
    assert_trees_close(state["params"], good["params"], rtol=0, atol=0)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


# ---------------------------------------------------------------------------------------------
# Bad input: one `bam_jax: error:` line, exit code 2, nothing already written is lost.


@pytest.mark.parametrize("override,expected", [
    ("--config.optimizer.nope=1", "bam_jax: error: --config.optimizer.nope: no such config field"),
    ("--config.batch_size=abc",
     "bam_jax: error: flag --config.batch_size=abc: invalid literal for int() with base 10: "
     "'abc'")], ids=["unknown_key", "wrong_type"])
def test_unknown_key_and_wrong_type_are_one_line(tmp_path, run_main, tiny_config_file,
                                                 error_line, override, expected):
    # Parsed by cli.flags_parser, as app.run does (test_main.py runs a real process's parser).
    code, _, err = run_main(tiny_config_file, str(tmp_path / "w"), override)
    assert code == 2
    assert error_line(err) == expected
    assert not (tmp_path / "w").exists()


def test_batch_not_divisible_by_devices(tmp_path, run_main, tiny_config_file):
    code, _, err = run_main(tiny_config_file, str(tmp_path / "w"), "--config.batch_size=36")
    assert code == 2
    assert_one_error_line(err, "batch size 36 does not divide by the 8 devices on mesh axes "
                               "('data', 'fsdp'); set the batch size to a multiple of 8")


def test_another_models_checkpoint_is_refused_and_kept(tmp_path, chain, run_main, tiny_config_file,
                                                       resume_from, read_state, assert_trees_close,
                                                       read_metrics):
    workdir = str(tmp_path / "w")
    resume_from(chain.full, workdir, step=4)
    code, _, err = run_main(tiny_config_file, workdir,
                            "--config.model.projector.hidden_dim=48")
    assert code == 2
    assert_one_error_line(err, "(step 4) does not match the configured model; use a new "
                               "--workdir or the config it was trained with")
    assert _steps(workdir) == [4] and max(read_metrics(workdir)) == 4
    assert_trees_close(read_state(chain.full, 4), read_state(workdir, 4), rtol=0, atol=0)


def test_empty_folder(tmp_path, run_main, tiny_config_file):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    code, _, err = run_main(tiny_config_file, str(tmp_path / "w"), "--config.data.source=folder",
                            f"--config.data.folder={tmp_path / 'data'}")
    assert code == 2
    assert_one_error_line(err, f"folder source: no images found under "
                               f"'{tmp_path / 'data' / 'train'}'")


def test_unprepared_tfds(tmp_path, run_main, tiny_config_file):
    code, _, err = run_main(tiny_config_file, str(tmp_path / "w"), "--config.data.source=tfds",
                            "--config.data.tfds_name=mnist",
                            f"--config.data.data_dir={tmp_path / 'empty'}")
    assert code == 2
    assert_one_error_line(err, "tfds dataset 'mnist' is not prepared in")


def test_bad_files_in_a_folder_are_skipped_and_counted(tmp_path, caplog, tiny_config):
    rng = np.random.default_rng(0)
    good = [tf.io.encode_png(rng.integers(0, 256, (28, 28, 3), np.uint8)).numpy()
            for _ in range(8)]
    for i, data in enumerate(good):  # 4 good images in each of 2 classes
        d = tmp_path / "train" / ("digits" if i < 4 else "other")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.png").write_bytes(data)
    d = tmp_path / "train" / "digits"
    (d / "notes.txt").write_bytes(b"not an image")  # no image header: skipped when listed
    (d / "empty.png").write_bytes(b"")  # empty: skipped when listed
    (d / "truncated.png").write_bytes(good[0][:40])  # header, no body: skipped at decode
    (d / "corrupt.png").write_bytes(good[0][:16] + os.urandom(200))  # garbage body: at decode
    config = tiny_config(backbone="convnet", teacher=False).data
    config.update(source="folder", folder=str(tmp_path), global_crop_size=16,
                  local_crops_number=0, eval_split="train")
    pipeline.scan_image_folder.cache_clear()
    with caplog.at_level("WARNING"):
        assert pipeline.num_examples(config, "train") == 8
    assert "folder source: skipped 2 non-image files of 12 under" in caplog.text
    assert "left out 2 of 10 image files" in caplog.text
    assert "digits/corrupt.png, digits/truncated.png" in caplog.text
    scanned = pipeline.scan_image_folder(str(tmp_path), "train")
    assert scanned.skipped == 2
    assert scanned.undecodable == (str(d / "corrupt.png"), str(d / "truncated.png"))
    assert scanned.class_names == ("digits", "other")
    assert pipeline.num_channels(config) == 3
    dataset = pipeline.create_pretrain_dataset(config, global_batch_size=8, seed=0)
    batches = [b for _, b in zip(range(4), dataset.as_numpy_iterator())]
    # Each epoch yields the 8 good images once: the undecodable ones are dropped, not a crash.
    for batch in batches:
        assert batch["global_crops"].shape == (8, 2, 16, 16, 3)
        assert sorted(batch["label"]) == [0] * 4 + [1] * 4
    # The eval pass sees the 8 good images once.
    seen = sum(b["mask"].sum() for b in pipeline.create_eval_dataset(
        config, "train", global_batch_size=4).as_numpy_iterator())
    assert seen == 8


def test_workdir_that_is_a_file(tmp_path, run_main, tiny_config_file):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_main(tiny_config_file, str(blocker / "w"))
    assert code == 2
    line = err.strip()
    assert_one_error_line(err, "bam_jax: error: [Errno ")
    assert ("[Errno 20] Not a directory" in line or "[Errno 17] File exists" in line), line


def test_read_only_workdir(tmp_path, chain, run_main, tiny_config_file, resume_from):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 555 does not stop root's writes (CAP_DAC_OVERRIDE); "
                    "test_workdir_that_is_a_file covers an unwritable workdir path")
    workdir = str(tmp_path / "w")
    resume_from(chain.full, workdir, step=4)
    os.chmod(workdir, 0o555)
    try:
        code, _, err = run_main(tiny_config_file, workdir)
    finally:
        os.chmod(workdir, 0o755)
    assert code == 2 and err.startswith("bam_jax: error: ")
    assert _steps(workdir) == [4]


def test_full_disk_on_metrics(tmp_path, chain, run_main, tiny_config_file, resume_from, read_state,
                              assert_trees_close):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full to simulate ENOSPC")
    workdir = str(tmp_path / "w")
    resume_from(chain.full, workdir, step=4)
    kept = os.path.join(workdir, "metrics.before")
    shutil.copy(os.path.join(workdir, "metrics.jsonl"), kept)
    os.remove(os.path.join(workdir, "metrics.jsonl"))
    os.symlink("/dev/full", os.path.join(workdir, "metrics.jsonl"))  # every write: ENOSPC
    code, _, err = run_main(tiny_config_file, workdir)
    assert code == 2
    assert_one_error_line(err, "No space left on device")
    assert 4 in _steps(workdir)
    assert_trees_close(read_state(chain.full, 4), read_state(workdir, 4), rtol=0, atol=0)


def test_linear_probe_without_a_checkpoint(tmp_path, capsys, tiny_config):
    pretrain = tmp_path / "pre"
    pretrain.mkdir()
    config = tiny_config(backbone="convnet", teacher=False)
    (pretrain / "config.json").write_text(config.to_json_best_effort())
    from configs import linear_default
    probe = linear_default.get_config()
    probe.pretrained_workdir = str(pretrain)
    probe.batch_size = 32
    with pytest.raises(SystemExit) as exit_:
        linear_probe._main(probe, str(tmp_path / "probe"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"bam_jax.evals.linear_probe: error: no checkpoint in {pretrain / 'checkpoints'}: pretrain "
        f"first"), err
    assert "random_init=True" in lines[0], lines[0]
    assert not os.path.exists(pretrain / "checkpoints")


def test_resume_under_a_config_that_changes_the_run_is_refused(tmp_path, chain, run_main,
                                                               tiny_config_file, resume_from,
                                                               read_metrics):
    workdir = str(tmp_path / "w")
    resume_from(chain.full, workdir, step=4)
    config_json = open(os.path.join(workdir, "config.json")).read()
    code, _, err = run_main(tiny_config_file, workdir, "--config.batch_size=64",
                            "--config.loss.top_k=8")
    assert code == 2
    assert_one_error_line(err, "the checkpoint of step 4 was trained with another config: "
                               "batch_size 32 -> 64; loss.top_k 16 -> 8.")
    assert "--config.allow_changed_fields=batch_size,loss.top_k" in err
    assert open(os.path.join(workdir, "config.json")).read() == config_json
    assert _steps(workdir) == [4] and max(read_metrics(workdir)) == 4


def test_a_shorter_run_than_the_checkpoint_is_refused(tmp_path, chain, run_main, tiny_config_file,
                                                      resume_from):
    workdir = str(tmp_path / "w")
    resume_from(chain.full, workdir, step=6)
    config_json = open(os.path.join(workdir, "config.json")).read()
    code, _, err = run_main(tiny_config_file, workdir, "--config.num_train_steps=4",
                            "--config.allow_changed_fields=num_train_steps")
    assert code == 2
    assert_one_error_line(err, "the checkpoint is at step 6, past the 4 steps this config")
    assert open(os.path.join(workdir, "config.json")).read() == config_json
    # Extending a run is a deliberate change: allowed, it trains on from the checkpoint.
    code, out, _ = run_main(tiny_config_file, workdir, "--config.num_train_steps=10",
                            "--config.allow_changed_fields=num_train_steps")
    assert code == 0 and "resumed from the checkpoint of step 6" in out and "done: step 10" in out


def test_sigint_saves_like_sigterm(tmp_path, monkeypatch, run_main, tiny_config_file,
                                   read_metrics):
    monkeypatch.setattr(train, "_agreed_stop", _signal_at_step(signal.SIGINT, 3))
    workdir = str(tmp_path / "w")
    code, out, err = run_main(tiny_config_file, workdir)
    assert code == 0, err
    assert "SIGINT: saved step 4 and stopped; rerun the same command to resume" in out
    assert _steps(workdir) == [2, 4] and max(read_metrics(workdir)) == 4
    assert "Traceback" not in err and "Event loop is closed" not in err


@pytest.mark.slow
def test_a_second_run_on_a_workdir_in_use_is_refused(tmp_path, run_main, tiny_config_file,
                                                     subprocess_env):
    workdir = tmp_path / "w"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from bam_jax import checkpoint\n"
         "checkpoint.WorkdirLock(sys.argv[1], process_index=0).acquire()\n"
         "print('held', flush=True)\n"
         "time.sleep(600)\n", str(workdir)],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_main(tiny_config_file, str(workdir))
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert_one_error_line(err, f"is in use by another run (pid {holder.pid} on ")
    assert not os.path.exists(workdir / "checkpoints")  # refused before touching anything


def test_a_second_ctrl_c_in_the_loop_stops_without_a_torn_checkpoint(tmp_path, monkeypatch,
                                                                     run_main, tiny_config_file,
                                                                     read_state):
    agreed_stop = train._agreed_stop

    def second_ctrl_c_at_step_3(requested, step, every):
        if step == 3:  # what the handler raises on a second Ctrl-C
            raise KeyboardInterrupt
        return agreed_stop(requested, step, every)

    monkeypatch.setattr(train, "_agreed_stop", second_ctrl_c_at_step_3)
    workdir = str(tmp_path / "w")
    code, _, err = run_main(tiny_config_file, workdir)
    assert code == 2
    assert_one_error_line(err, "stopped by a second Ctrl-C after step 3; the last checkpoint is "
                               "step 2; rerun the same command to resume")
    assert _steps(workdir) == [2] and not _tmp_dirs(workdir)  # the async save completed
    read_state(workdir, 2)
    assert not os.path.exists(os.path.join(workdir, "LOCK"))
