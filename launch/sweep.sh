#!/usr/bin/env bash
# Run bam_jax.main over the grid of config overrides, one workdir per combination, in order.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/sweep.sh --config=CONFIG --workdir_root=DIR [options] KEY=V1,V2 [KEY=V1,V2 ...]
                       [-- EXTRA_ARG ...]

Every combination of the listed values runs as
  python -m bam_jax.main --config=CONFIG --workdir=DIR/KEY=V1+KEY2=W1 --config.KEY=V1 \
      --config.KEY2=W1 EXTRA_ARG ...
one after the other (a rerun resumes each workdir; finished runs stop at once). Values are
split on commas, so a value cannot contain one. Exits 1 if any run failed.

Required:
  --config=CONFIG        config file
  --workdir_root=DIR     parent of the per-combination workdirs
Options:
  --python=PYTHON        interpreter (default: python)
  --dry_run              print the commands instead of running them
  -h, --help             this help
Example:
  launch/sweep.sh --config=configs/default.py --workdir_root=workdirs/sweep \
      loss.temperature=0.1,0.2 loss.sinkhorn_reg=0.02,0.05 -- --config.num_epochs=2
USAGE
}

die() { echo "error: $*" >&2; usage >&2; exit 2; }

config="" root="" python="python" dry_run=0
axes=() extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --config=*) config="${1#*=}" ;;
    --workdir_root=*) root="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) shift; extra=("$@"); break ;;
    -*) die "unknown argument: $1" ;;
    *=?*) axes+=("$1") ;;
    *) die "expected KEY=V1,V2, got: $1" ;;
  esac
  shift
done
[[ -n "$config" ]] || die "--config is required"
[[ -n "$root" ]] || die "--workdir_root is required"
(( ${#axes[@]} > 0 )) || die "give at least one KEY=V1,V2 axis"

# The grid as lines of space-separated KEY=VALUE, the first axis varying slowest.
combos=("")
for axis in "${axes[@]}"; do
  key="${axis%%=*}"
  IFS=, read -r -a values <<< "${axis#*=}"
  next=()
  for combo in "${combos[@]}"; do
    for value in "${values[@]}"; do
      next+=("${combo:+$combo }$key=$value")
    done
  done
  combos=("${next[@]}")
done

failed=()
for combo in "${combos[@]}"; do
  read -r -a pairs <<< "$combo"
  name=$(IFS=+; echo "${pairs[*]}")
  name=${name//\//_}  # a value with a slash must not nest directories
  cmd=("$python" -m bam_jax.main --config="$config" --workdir="$root/$name")
  for pair in "${pairs[@]}"; do
    cmd+=("--config.$pair")
  done
  cmd+=("${extra[@]}")
  if [[ "$dry_run" == 1 ]]; then
    echo "${cmd[*]}"
  else
    echo "=== $name" >&2
    "${cmd[@]}" || failed+=("$name")
  fi
done
if (( ${#failed[@]} > 0 )); then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
