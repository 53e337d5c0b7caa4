#!/usr/bin/env bash
# Create a Cloud TPU VM (v4, v5e, v5p or v6e) with the runtime image its generation needs.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm_create.sh --name=NAME --zone=ZONE --accelerator=TYPE [options]

Create a TPU VM with `gcloud compute tpus tpu-vm create`.

Required:
  --name=NAME            TPU VM name
  --zone=ZONE            e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)
  --accelerator=TYPE     v4-8 | v4-32 | v5litepod-8 | v5p-8 | v6e-8 | ...
Options:
  --version=RUNTIME      TPU software version (default by generation: v4 tpu-ubuntu2204-base,
                         v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --project=PROJECT      GCP project (default: gcloud's configured one)
  --spot                 request a Spot VM (preemptible; training resumes from its checkpoint)
  --dry_run              print the gcloud command instead of running it
  -h, --help             this help
USAGE
}

die() { echo "error: $*" >&2; usage >&2; exit 2; }

name="" zone="" accelerator="" version="" project="" spot=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --spot) spot=1 ;;
    --dry_run) dry_run=1 ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ -n "$accelerator" ]] || die "--accelerator is required"

if [[ -z "$version" ]]; then
  case "$accelerator" in
    v4-*) version="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) die "unknown accelerator type '$accelerator'; pass --version=RUNTIME" ;;
  esac
fi

cmd=(gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accelerator"
     --version="$version")
[[ -n "$project" ]] && cmd+=(--project="$project")
[[ "$spot" == 1 ]] && cmd+=(--spot)
if [[ "$dry_run" == 1 ]]; then
  echo "${cmd[*]}"
else
  "${cmd[@]}"
fi
