#!/usr/bin/env bash
# The one call to make on a lent GPU machine (issues 13 and 17): python -m bench.gpu_check --device cuda, then
# ROAD's speed (python -m bench.metrics --only road), with everything measured written under $OUT (the device
# tool's folder that comes back), else bench/results/gpu_check/.
#
#   bench/gpu_check.sh [more bench.gpu_check arguments, e.g. --methods all or --sections pipeline,evaluate]
#
# On the device machine (no .venv, no package registry) first build the bundle here, then carry it:
#   .venv/bin/python -m bench.gpu_bundle            # -> .gpu_bundle/site.tar.xz (~30 MiB: Ray, Captum, ...)
#   device run: command "bench/gpu_check.sh", carry [".gpu_bundle"], timeout_s 420
#
# Writes $OUT/gpu_check.json (rewritten after every section, so a kill keeps what was measured),
# $OUT/gpu_check.log (the printed tables), $OUT/ray_data_operators.json and .log (per Ray Data operator of the
# pipeline sections: task times, back-pressure, USS; bench.ray_data_log), $OUT/metrics_road.json and .log.
# The check keeps to --budget-s (default 240 s) by skipping what is left; GPU_CHECK_TIMEOUT_S (default 290) is its
# hard stop (SIGINT, the JSON is written, then the exit); the ROAD step has GPU_CHECK_ROAD_TIMEOUT_S (default 75;
# 0 skips it; GPU_CHECK_ROAD_ARGS adds bench.metrics arguments). Both run on GPU_CHECK_DEVICE (default cuda; `cpu` with
# --tiny is the dry run of tests/test_gpu_bundle.py). GPU_CHECK_BUNDLE: another bundle than .gpu_bundle/site.tar.xz.
# Python: $GPU_CHECK_PYTHON if set, else make test's .venv/bin/python, else (with a bundle) python3; where none of
# them is there, .venv is built first with `make .venv/.installed` (minutes, and it needs the package registry).
# When that Python cannot import Ray and .gpu_bundle/site.tar.xz exists, the bundle is unpacked into a temporary
# folder put on PYTHONPATH (with this checkout, which Ray's workers import the project from).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root="$PWD"
out="${OUT:-bench/results/gpu_check}"
mkdir -p "$out" || exit 1
bundle="${GPU_CHECK_BUNDLE:-.gpu_bundle/site.tar.xz}"
device="${GPU_CHECK_DEVICE:-cuda}"
py="${GPU_CHECK_PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then
        py=.venv/bin/python
    elif [ -f "$bundle" ]; then
        py=python3
    else
        echo "gpu_check.sh: no .venv and no $bundle: building .venv with 'make .venv/.installed' first (takes minutes)" >&2
        make .venv/.installed || exit 1
        py=.venv/bin/python
    fi
fi
if ! "$py" -c "import ray" 2>/dev/null && [ -f "$bundle" ]; then
    site="$(mktemp -d "${TMPDIR:-/tmp}/gpu_bundle.XXXXXX")" || exit 1
    trap 'rm -rf "$site"' EXIT
    unpacked="$("$py" -m bench.gpu_bundle --unpack "$bundle" --into "$site")" || exit 1
    export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check.sh: from $unpacked"
fi
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
if ! "$py" -c "import torch, ray, captum, pyarrow, webdataset, braceexpand, pytorch_grad_cam" 2>"$out/imports.err"; then
    echo "gpu_check.sh: $py cannot import what the check needs: $(tail -n 1 "$out/imports.err")" >&2
    echo "gpu_check.sh: build the bundle with '.venv/bin/python -m bench.gpu_bundle' and carry .gpu_bundle" >&2
    exit 1
fi
rm -f "$out/imports.err"
"$py" -c "import sys, torch, ray; print(f'gpu_check.sh: Python {sys.version.split()[0]}, torch {torch.__version__}, ray {ray.__version__}, cuda {torch.cuda.is_available()}')"
timeout -s INT -k 20 "${GPU_CHECK_TIMEOUT_S:-290}" \
    "$py" -m bench.gpu_check --device "$device" --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
rc=${PIPESTATUS[0]}
# where the pipeline sections' time went, per Ray Data operator (read from Ray Data's own log; never fails the run)
timeout -k 5 30 "$py" -m bench.ray_data_log --from-log "$out/gpu_check.log" --out "$out/ray_data_operators.json" 2>&1 \
    | tee "$out/ray_data_operators.log"
road_timeout="${GPU_CHECK_ROAD_TIMEOUT_S:-75}"
if [ "$road_timeout" != 0 ]; then
    timeout -s INT -k 10 "$road_timeout" \
        "$py" -m bench.metrics --device "$device" --only road --out "$out/metrics_road.json" ${GPU_CHECK_ROAD_ARGS:-} 2>&1 \
        | tee "$out/metrics_road.log"
    road_rc=${PIPESTATUS[0]}
    echo "gpu_check.sh: ROAD step exit $road_rc"
    [ "$rc" = 0 ] && rc=$road_rc
fi
echo "gpu_check.sh: exit $rc; in $out: $(ls "$out" | tr '\n' ' ')"
exit "$rc"
