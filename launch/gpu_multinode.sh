#!/usr/bin/env bash
# One bam_jax process per GPU node: derive the jax.distributed settings from SLURM (or take them
# from flags for any other launcher) and run bam_jax.main with all of the node's GPUs.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gpu_multinode.sh --config=CONFIG --workdir=WORKDIR [options] [--] [KEY=VALUE ...]

Run once per node, e.g. inside an sbatch script:
  srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 \
      launch/gpu_multinode.sh --config=configs/vit_b.py --workdir=/shared/runs/vit_b
or with any other launcher, giving the rendezvous explicitly on every node:
  launch/gpu_multinode.sh --coordinator=node0:12355 --num_processes=4 --process_id=$RANK ...

Exports JAX_COORDINATOR_ADDRESS (first host of SLURM_JOB_NODELIST, via scontrol, plus --port),
JAX_NUM_PROCESSES, JAX_PROCESS_ID and JAX_LOCAL_DEVICE_IDS (every GPU of this node, so
jax.distributed does not narrow a SLURM task to one GPU), then runs
`python -m bam_jax.main --config=CONFIG --workdir=WORKDIR --config.KEY=VALUE ...`.

Required:
  --config=CONFIG        config file
  --workdir=WORKDIR      run directory, shared by all nodes
Options:
  --coordinator=HOST:PORT   coordinator (default under SLURM: first node, --port)
  --port=PORT            coordinator port under SLURM (default: 12355)
  --num_processes=N      number of nodes (default: SLURM_NTASKS)
  --process_id=I         this node's rank (default: SLURM_PROCID)
  --gpus_per_node=G      GPUs on this node (default: CUDA_VISIBLE_DEVICES, else nvidia-smi -L)
  --python=PYTHON        interpreter (default: python)
  --dry_run              print the environment and command instead of running them
  -h, --help             this help
USAGE
}

die() { echo "error: $*" >&2; usage >&2; exit 2; }

config="" workdir="" coordinator="" port=12355 num_processes="" process_id="" gpus=""
python="python" dry_run=0
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --coordinator=*) coordinator="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --num_processes=*) num_processes="${1#*=}" ;;
    --process_id=*) process_id="${1#*=}" ;;
    --gpus_per_node=*) gpus="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) ;;
    --config.*=*) overrides+=("$1") ;;
    -*) die "unknown argument: $1" ;;
    *=*) overrides+=("--config.$1") ;;
    *) die "expected KEY=VALUE, got: $1" ;;
  esac
  shift
done
[[ -n "$config" ]] || die "--config is required"
[[ -n "$workdir" ]] || die "--workdir is required"

if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
  if [[ -z "$coordinator" ]]; then
    first_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    coordinator="$first_host:$port"
  fi
  num_processes="${num_processes:-${SLURM_NTASKS:-}}"
  process_id="${process_id:-${SLURM_PROCID:-}}"
fi
[[ -n "$coordinator" ]] || die "--coordinator is required outside SLURM"
[[ "$num_processes" =~ ^[0-9]+$ ]] || die "--num_processes is required outside SLURM"
[[ "$process_id" =~ ^[0-9]+$ ]] || die "--process_id is required outside SLURM"
(( process_id < num_processes )) || die "--process_id=$process_id must be below $num_processes"

if [[ -z "$gpus" ]]; then
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
    gpus=${#visible[@]}
  else
    gpus=$(nvidia-smi -L | grep -c '^GPU')
  fi
fi
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "no GPUs found; pass --gpus_per_node"

export JAX_COORDINATOR_ADDRESS="$coordinator"
export JAX_NUM_PROCESSES="$num_processes"
export JAX_PROCESS_ID="$process_id"
JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
export JAX_LOCAL_DEVICE_IDS
cmd=("$python" -m bam_jax.main --config="$config" --workdir="$workdir" "${overrides[@]}")
if [[ "$dry_run" == 1 ]]; then
  for name in JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID JAX_LOCAL_DEVICE_IDS; do
    echo "$name=${!name}"
  done
  echo "${cmd[*]}"
else
  exec "${cmd[@]}"
fi
