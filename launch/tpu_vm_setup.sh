#!/usr/bin/env bash
# Put this repository on every worker of a TPU VM and install it into a venv with the TPU jax.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm_setup.sh --name=NAME --zone=ZONE [options]

On all workers: get the code (git clone, or a copy of this checkout), create DIR/.venv,
`pip install -r requirements.txt`, then `pip install "jax[tpu]==JAX_VERSION"`.

Required:
  --name=NAME            TPU VM name
  --zone=ZONE            its zone
Options:
  --repo=URL             git URL to clone (default: copy this checkout's tracked and
                         untracked-but-not-ignored files)
  --dir=DIR              directory on the workers, relative to the home dir (default: bam_jax)
  --jax_version=V        jax[tpu] version (default: 0.10.2, the version requirements.txt pins)
  --project=PROJECT      GCP project
  --dry_run              print the gcloud commands instead of running them
  -h, --help             this help
USAGE
}

die() { echo "error: $*" >&2; usage >&2; exit 2; }

name="" zone="" repo="" dir="bam_jax" jax_version="0.10.2" project="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --repo=*) repo="${1#*=}" ;;
    --dir=*) dir="${1#*=}" ;;
    --jax_version=*) jax_version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"

gcloud_args=(--zone="$zone" --worker=all)
[[ -n "$project" ]] && gcloud_args+=(--project="$project")

run() {
  if [[ "$dry_run" == 1 ]]; then echo "$*"; else "$@"; fi
}

qdir=$(printf '%q' "$dir")
if [[ -n "$repo" ]]; then
  fetch="if [ -d $qdir/.git ]; then git -C $qdir pull --ff-only; else git clone $(printf '%q' "$repo") $qdir; fi"
else
  # The workers get exactly what `git status` would commit, without .git, venvs or workdirs.
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  tarball=$(mktemp -t bam_jax.XXXXXX.tar.gz)
  trap 'rm -f "$tarball"' EXIT
  (cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$tarball")
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:bam_jax_src.tar.gz" "${gcloud_args[@]}"
  fetch="mkdir -p $qdir && tar -xzf bam_jax_src.tar.gz -C $qdir && rm bam_jax_src.tar.gz"
fi
install="cd $qdir && python3 -m venv .venv && .venv/bin/pip install -q -U pip \
&& .venv/bin/pip install -q -r requirements.txt \
&& .venv/bin/pip install -q $(printf '%q' "jax[tpu]==$jax_version") \
&& .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].platform)'"
run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --command="set -e; $fetch; $install"
