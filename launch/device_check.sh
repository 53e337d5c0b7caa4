#!/usr/bin/env bash
# The one accelerator check: ViT-S/16 and ViT-B/16 train-step benchmarks at the largest batch
# that fits (bf16) and the on-device augmentation cost, into one JSON, in under 8 minutes.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/device_check.sh --output=FILE [options] [-- EXTRA_FLAG ...]

Runs `python -m bam_jax.tools.device_check --output=FILE` from the repository root: for
ViT-S/16 and ViT-B/16 (2x224 + 6x96 crops, EMA teacher, AdamW, bf16) the largest batch that fits,
from 256 and 128 halving after an out-of-memory failure, with its step time, images/s and MFU;
then the on-device photometric augmentation's cost per batch. Everything within --budget_s
(default 420 s) of the start.
XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.92 here (JAX's own default 0.75 would refuse
batches that fit). EXTRA_FLAGs go to the module (e.g. --start_batches=512,256).

Required:
  --output=FILE          the JSON to write
Options:
  --tiny                 a 2-block ViT on 32/16 px crops: the whole check on a CPU in ~1 minute
  --python=PYTHON        interpreter (default: python)
  -h, --help             this help
USAGE
}

die() { echo "error: $*" >&2; usage >&2; exit 2; }

output="" python="python"
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --output=*) output="${1#*=}" ;;
    --tiny) extra+=("--tiny") ;;
    --python=*) python="${1#*=}" ;;
    --) shift; extra+=("$@"); break ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
[[ -n "$output" ]] || die "--output is required"
output="$(cd "$(dirname "$output")" && pwd)/$(basename "$output")"

cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
exec "$python" -m bam_jax.tools.device_check --output="$output" "${extra[@]}"
