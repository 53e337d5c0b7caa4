"""Two processes on localhost (2 CPU devices each) train as one process with 4 devices, and a
SIGTERM on one of them stops both at the same step.

`python -m bam_jax.main` is started twice with the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID contract of `main._distributed_kwargs`; jax 0.10.2 uses gloo for CPU collectives
across processes by default, so nothing else is set.

The reference sees the same global batches: the pipeline gives each process a contiguous block of
the epoch's permutation (process i reads rows [i * N/2, (i + 1) * N/2)), so the 2-process global
batch of step s is (rows s*16.. of block 0) + (rows s*16.. of block 1), not rows s*32.. of the
single-process stream. The reference therefore trains in this process on the per-step
concatenation of the two per-process streams, which `create_pretrain_dataset` builds with
explicit `process_index` / `process_count`.
"""

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from bam_jax import train
from bam_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 500  # never reached: process 1 gets a SIGTERM once process 0 has logged step 4

TINY_CONFIG = f'''
from configs import default


def get_config():
    config = default.get_config()
    config.batch_size = 32
    config.num_train_steps = {STEPS}
    config.data.local_crops_number = 0
    config.model.convnet.channels = (8, 16)
    config.model.convnet.strides = (2, 2)
    # Every projector Linear feeds a BatchNorm, so its bias has a zero true gradient; Adam
    # would turn that gradient's float noise (which differs with the device count) into
    # updates. Without the (redundant) bias, runs on different device counts compare.
    config.model.projector.update(hidden_dim=64, out_dim=32, bias=False)
    config.knn.enabled = False
    config.log_every_steps = 1
    config.checkpoint_every_steps = 1000  # only the step the run stops at is saved
    config.async_checkpointing = False
    config.stop_check_every_steps = 2
    config.optimizer.warmup_epochs = 0  # the peak rate from step 1, not 1/125 of it
    return config
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_config(path):
    spec = importlib.util.spec_from_file_location("tiny_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def start_process(process_id, port, config_path, workdir, log_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get(
                   "PYTHONPATH")])), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(process_id), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    # A log file, not a pipe: a full pipe would block the child while this process trains.
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "bam_jax.main", f"--config={config_path}",
             f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def two_processes(tmp_path, config_path, workdir, hang: str):
    """Both processes of a 2-process `bam_jax.main` run, with their logs; killed on exit; a
    wait that times out fails the test with `hang` and the logs' tails."""
    try:
        port = free_port()
    except OSError as error:
        pytest.skip(f"no TCP on localhost for the JAX coordinator: {error}")
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    processes = [start_process(i, port, config_path, workdir, logs[i]) for i in range(2)]
    try:
        yield processes, logs
    except subprocess.TimeoutExpired:
        pytest.fail(f"{hang}:\n" + "\n".join(
            f"--- process {i}\n{log.read_text()[-3000:]}" for i, log in enumerate(logs)))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()


def two_process_stream(original):
    """What the 2-process run's global batches hold, as one single-process stream."""

    def create(data_config, *, global_batch_size, seed, start_step=0, **kwargs):
        shards = [original(data_config, global_batch_size=global_batch_size, seed=seed,
                           start_step=start_step, process_index=i, process_count=2, **kwargs)
                  for i in range(2)]
        return tf.data.Dataset.zip(*shards).map(
            lambda a, b: {key: tf.concat([a[key], b[key]], axis=0) for key in a})

    return create


@pytest.mark.slow
def test_sigterm_on_one_host_stops_both_at_the_same_step_and_two_processes_train_as_one(
        tmp_path, monkeypatch, read_metrics, read_state, assert_trees_close):
    config_path = tmp_path / "tiny.py"
    config_path.write_text(TINY_CONFIG)
    multi = str(tmp_path / "multi")
    with two_processes(tmp_path, config_path, multi,
                       "a host waited forever after the other stopped") as (processes, logs):
        deadline = time.monotonic() + 300
        while "step 4/" not in logs[0].read_text():
            assert all(p.poll() is None for p in processes), logs[0].read_text()[-3000:]
            assert time.monotonic() < deadline, "the 2-process run did not reach step 4"
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGTERM)  # a preemption notice on one host only
        codes = [p.wait(timeout=300) for p in processes]
    outputs = [log.read_text() for log in logs]
    for i, (code, output) in enumerate(zip(codes, outputs)):
        assert code == 0, f"process {i} exited {code}:\n{output[-4000:]}"
        assert "bam_jax: 2 process(es), 4 device(s) (cpu)" in output, output[-4000:]
    # The stop request is shared every 2 steps: both saved the same step, and said why.
    saved = [int(o.split(": saved step ")[1].split()[0]) for o in outputs]
    assert saved[0] == saved[1] and saved[0] % 2 == 0 and 4 <= saved[0] < STEPS, outputs
    stop = saved[0]
    assert f"SIGTERM: saved step {stop}" in outputs[1]
    assert f"a stop request on another process: saved step {stop}" in outputs[0]
    steps = [int(n) for n in os.listdir(os.path.join(multi, "checkpoints")) if n.isdigit()]
    assert steps == [stop]
    assert "step 1/" in outputs[0] and "step 1/" not in outputs[1]  # console: process 0 only

    # The reference: this process on 4 devices, the same global batches, stopped at `stop` by
    # a SIGTERM in the step before (a single process stops at once).
    config = load_config(config_path)
    config.mesh.num_devices = 4
    monkeypatch.setattr(pipeline, "create_pretrain_dataset",
                        two_process_stream(pipeline.create_pretrain_dataset))
    agreed_stop = train._agreed_stop

    def sigterm_before_stop(requested, step, every):
        if step == stop - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return agreed_stop(requested, step, every)

    monkeypatch.setattr(train, "_agreed_stop", sigterm_before_stop)
    single = str(tmp_path / "single")
    assert train.train_and_evaluate(config, single)["step"] == stop

    # Both processes share the workdir: one row per step means only process 0 wrote it.
    with open(os.path.join(multi, "metrics.jsonl")) as f:
        assert sum(1 for _ in f) == stop
    multi_metrics, single_metrics = read_metrics(multi), read_metrics(single)
    assert sorted(multi_metrics) == sorted(single_metrics) == list(range(1, stop + 1))
    for step in range(1, stop + 1):
        np.testing.assert_allclose(multi_metrics[step]["loss"], single_metrics[step]["loss"],
                                   rtol=1e-4)
    reference = read_state(single, stop)
    # The 2-process checkpoint names devices this process lacks: restore it onto the reference's.
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, reference)
    restored = ocp.StandardCheckpointer().restore(
        os.path.join(multi, "checkpoints", str(stop), "state"), target)
    assert_trees_close(restored["params"], reference["params"], rtol=1e-3, atol=2e-5)
