#!/usr/bin/env bash
# One-command GPU validation: build, CUDA tests, op and model benchmarks, training step, each with
# its own timeout inside a global budget (default 8 minutes). See fastseg/gpu_check.py.
#   benchmarks/gpu_check.sh OUTDIR [--budget SECONDS] [--skip-build] [--cpu-rehearsal]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: benchmarks/gpu_check.sh OUTDIR [--budget SECONDS] [--skip-build] [--cpu-rehearsal]}"
shift
exec "${PYTHON:-python3}" -m fastseg.gpu_check --out "$out" "$@"
