#!/usr/bin/env bash
# Stop the training job on every worker (SIGTERM: bam_jax saves a checkpoint, then exits);
# optionally delete the TPU VM afterwards.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm_stop.sh --name=NAME --zone=ZONE [options]

Sends SIGTERM to the job started by tpu_vm_train.sh on all workers and waits for it to exit
(bam_jax checkpoints on SIGTERM, so the same tpu_vm_train.sh command resumes it).

Required:
  --name=NAME            TPU VM name
  --zone=ZONE            its zone
Options:
  --delete               delete the TPU VM once the job has stopped
  --dir=DIR              code directory on the workers (default: bam_jax)
  --timeout=SECONDS      how long to wait for the checkpoint before SIGKILL (default: 300)
  --project=PROJECT      GCP project
  --dry_run              print the gcloud commands instead of running them
  -h, --help             this help
USAGE
}

die() { echo "error: $*" >&2; usage >&2; exit 2; }

name="" zone="" delete=0 dir="bam_jax" timeout=300 project="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --delete) delete=1 ;;
    --dir=*) dir="${1#*=}" ;;
    --timeout=*) timeout="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ "$timeout" =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds"

project_args=()
[[ -n "$project" ]] && project_args+=(--project="$project")

run() {
  if [[ "$dry_run" == 1 ]]; then echo "$*"; else "$@"; fi
}

pidfile="$(printf '%q' "$dir")/train.pid"
remote="if [ -f $pidfile ] && kill -TERM \$(cat $pidfile) 2>/dev/null; then \
for _ in \$(seq $timeout); do kill -0 \$(cat $pidfile) 2>/dev/null || break; sleep 1; done; \
kill -KILL \$(cat $pidfile) 2>/dev/null || true; echo \"worker \$(hostname): stopped\"; \
else echo \"worker \$(hostname): no running job\"; fi"
run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all "${project_args[@]}" \
  --command="$remote"
if [[ "$delete" == 1 ]]; then
  run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" "${project_args[@]}" --quiet
fi
