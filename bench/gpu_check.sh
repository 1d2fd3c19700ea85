#!/usr/bin/env bash
# The one call to make on a lent GPU machine (issue 13): python -m bench.gpu_check --device cuda, with everything
# it measured written under $OUT (the device tool's folder that comes back), else bench/results/gpu_check/.
#
#   bench/gpu_check.sh [more bench.gpu_check arguments, e.g. --methods all or --sections pipeline,evaluate]
#
# Writes $OUT/gpu_check.json (rewritten after every section, so a kill keeps what was measured) and
# $OUT/gpu_check.log (the printed tables). The check keeps to --budget-s (default 240 s) by skipping what is
# left; GPU_CHECK_TIMEOUT_S (default 290) is the hard stop: SIGINT, the JSON is written, then the exit.
# Python: $GPU_CHECK_PYTHON if set, else make test's .venv/bin/python; where .venv is missing it is built first
# with `make .venv/.installed` (minutes, and it needs the package registry).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-bench/results/gpu_check}"
mkdir -p "$out" || exit 1
py="${GPU_CHECK_PYTHON:-.venv/bin/python}"
if [ ! -x "$py" ]; then
    echo "gpu_check.sh: $py not found: building .venv with 'make .venv/.installed' first (takes minutes)" >&2
    make .venv/.installed || exit 1
    py=.venv/bin/python
fi
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
timeout -s INT -k 20 "${GPU_CHECK_TIMEOUT_S:-290}" \
    "$py" -m bench.gpu_check --device cuda --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check.sh: exit $rc; in $out: $(ls "$out" | tr '\n' ' ')"
exit "$rc"
