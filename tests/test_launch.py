"""launch/*.sh: usage, argument checks, the commands they would run, shellcheck."""

import os
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.slow  # the scripts run as subprocesses

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
SCRIPTS = sorted(name for name in os.listdir(LAUNCH) if name.endswith(".sh"))


def run(name, *args, env=None):
    return subprocess.run([os.path.join(LAUNCH, name), *args], capture_output=True, text=True,
                          timeout=30, env=env)


def test_all_scripts_present():
    assert SCRIPTS == ["device_check.sh", "gpu_multinode.sh", "sweep.sh", "tpu_vm_create.sh",
                       "tpu_vm_logs.sh", "tpu_vm_setup.sh", "tpu_vm_stop.sh", "tpu_vm_train.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_and_missing_arguments(name):
    shown = run(name, "-h")
    assert shown.returncode == 0 and shown.stdout.startswith(f"Usage: launch/{name}")
    missing = run(name)
    assert missing.returncode != 0 and "error:" in missing.stderr and "Usage:" in missing.stderr
    unknown = run(name, "--no_such_flag=1")
    assert unknown.returncode != 0 and "unknown argument" in unknown.stderr


def test_sweep_dry_run_prints_the_grid():
    out = run("sweep.sh", "--dry_run", "--config=configs/default.py", "--workdir_root=w",
              "loss.temperature=0.1,0.2", "loss.top_k=0,64", "--", "--config.num_epochs=2")
    assert out.returncode == 0, out.stderr
    expected = [
        f"python -m bam_jax.main --config=configs/default.py --workdir=w/loss.temperature={t}"
        f"+loss.top_k={k} --config.loss.temperature={t} --config.loss.top_k={k} "
        f"--config.num_epochs=2"
        for t in ("0.1", "0.2") for k in ("0", "64")]
    assert out.stdout.splitlines() == expected


def test_tpu_train_forwards_overrides():
    out = run("tpu_vm_train.sh", "--dry_run", "--name=bam", "--zone=us-central2-b",
              "--config=configs/vit_s.py", "--workdir=gs://b/run", "--", "batch_size=1024",
              "--config.data.data_dir=gs://b/tfds")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        "gcloud compute tpus tpu-vm ssh bam --zone=us-central2-b --worker=all")
    assert ("nohup .venv/bin/python -m bam_jax.main --config=configs/vit_s.py --workdir=gs://b/run "
            "--config.batch_size=1024 --config.data.data_dir=gs://b/tfds > train.log") in out.stdout


def test_tpu_create_picks_the_runtime_of_the_generation():
    out = run("tpu_vm_create.sh", "--dry_run", "--name=bam", "--zone=us-east5-a",
              "--accelerator=v5p-8", "--spot")
    assert out.stdout.strip() == ("gcloud compute tpus tpu-vm create bam --zone=us-east5-a "
                                  "--accelerator-type=v5p-8 --version=v2-alpha-tpuv5 --spot")


def test_gpu_multinode_under_slurm(tmp_path):
    scontrol = tmp_path / "scontrol"  # stands in for SLURM's hostlist expansion
    scontrol.write_text("#!/bin/sh\nprintf 'gpu-a01\\ngpu-a02\\n'\n")
    scontrol.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}",
               SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_NTASKS="2", SLURM_PROCID="1",
               CUDA_VISIBLE_DEVICES="0,1,2,3")
    out = run("gpu_multinode.sh", "--dry_run", "--config=configs/vit_b.py", "--workdir=/runs/b",
              "batch_size=512", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "JAX_COORDINATOR_ADDRESS=gpu-a01:12355", "JAX_NUM_PROCESSES=2", "JAX_PROCESS_ID=1",
        "JAX_LOCAL_DEVICE_IDS=0,1,2,3",
        "python -m bam_jax.main --config=configs/vit_b.py --workdir=/runs/b "
        "--config.batch_size=512"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    out = subprocess.run(["shellcheck", *(os.path.join(LAUNCH, n) for n in SCRIPTS)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout
