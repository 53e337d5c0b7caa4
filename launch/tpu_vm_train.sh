#!/usr/bin/env bash
# Start bam_jax.main on every TPU worker in the background (nohup), logging to a file there.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm_train.sh --name=NAME --zone=ZONE --config=CONFIG --workdir=WORKDIR
                              [options] [--] [KEY=VALUE ...]

Runs `python -m bam_jax.main --config=CONFIG --workdir=WORKDIR --config.KEY=VALUE ...` with nohup
on all workers (in DIR, set up by tpu_vm_setup.sh); rerunning it resumes from WORKDIR's latest
checkpoint. Every worker must see the same WORKDIR (on a multi-host slice, a gs:// path).

Required:
  --name=NAME            TPU VM name
  --zone=ZONE            its zone
  --config=CONFIG        config file, relative to DIR (e.g. configs/vit_s.py)
  --workdir=WORKDIR      run directory (checkpoints, metrics)
Options:
  --dir=DIR              code directory on the workers, relative to home (default: bam_jax)
  --log=FILE             log file, relative to DIR (default: train.log)
  --project=PROJECT      GCP project
  --dry_run              print the gcloud command instead of running it
  -h, --help             this help
Trailing KEY=VALUE (or --config.KEY=VALUE) arguments become config overrides, e.g.
  launch/tpu_vm_train.sh --name=bam --zone=us-central2-b --config=configs/vit_s.py \
      --workdir=gs://BUCKET/bam_vit_s -- data.data_dir=gs://BUCKET/tfds batch_size=1024
USAGE
}

die() { echo "error: $*" >&2; usage >&2; exit 2; }

name="" zone="" config="" workdir="" dir="bam_jax" log="train.log" project="" dry_run=0
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --dir=*) dir="${1#*=}" ;;
    --log=*) log="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) ;;
    --config.*=*) overrides+=("$1") ;;
    -*) die "unknown argument: $1" ;;
    *=*) overrides+=("--config.$1") ;;
    *) die "expected KEY=VALUE, got: $1" ;;
  esac
  shift
done
[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ -n "$config" ]] || die "--config is required"
[[ -n "$workdir" ]] || die "--workdir is required"

gcloud_args=(--zone="$zone" --worker=all)
[[ -n "$project" ]] && gcloud_args+=(--project="$project")

main_args=$(printf '%q ' "--config=$config" "--workdir=$workdir" "${overrides[@]}")
qlog=$(printf '%q' "$log")
# setsid + redirected stdio: the job outlives the ssh session; its pid is kept for tpu_vm_stop.sh.
remote="cd $(printf '%q' "$dir") && { BAM_JAX_DISTRIBUTED=1 setsid nohup .venv/bin/python -m bam_jax.main ${main_args}\
> $qlog 2>&1 < /dev/null & echo \$! > train.pid; } && echo \"worker \$(hostname): started pid \$(cat train.pid)\""
cmd=(gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --command="$remote")
if [[ "$dry_run" == 1 ]]; then
  echo "${cmd[*]}"
else
  "${cmd[@]}"
fi
