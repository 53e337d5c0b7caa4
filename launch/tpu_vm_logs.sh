#!/usr/bin/env bash
# Follow the training log of worker 0 (the one that prints metrics).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm_logs.sh --name=NAME --zone=ZONE [options]

Required:
  --name=NAME            TPU VM name
  --zone=ZONE            its zone
Options:
  --worker=N             worker whose log to follow (default: 0)
  --dir=DIR              code directory on the workers (default: bam_jax)
  --log=FILE             log file, relative to DIR (default: train.log)
  --project=PROJECT      GCP project
  --dry_run              print the gcloud command instead of running it
  -h, --help             this help
USAGE
}

die() { echo "error: $*" >&2; usage >&2; exit 2; }

name="" zone="" worker=0 dir="bam_jax" log="train.log" project="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --worker=*) worker="${1#*=}" ;;
    --dir=*) dir="${1#*=}" ;;
    --log=*) log="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ "$worker" =~ ^[0-9]+$ ]] || die "--worker must be a number"

cmd=(gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker="$worker")
[[ -n "$project" ]] && cmd+=(--project="$project")
cmd+=(--command="tail -n 200 -F $(printf '%q' "$dir/$log")")
if [[ "$dry_run" == 1 ]]; then
  echo "${cmd[*]}"
else
  "${cmd[@]}"
fi
