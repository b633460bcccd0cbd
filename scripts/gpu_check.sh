#!/usr/bin/env bash
# The one-call GPU check (docs/GPU.md): on a machine with an NVIDIA GPU, offline, in about 8 minutes:
#
#     bash scripts/gpu_check.sh LOGDIR [WHEELDIR]
#
#   1. finds CuPy: this Python's, else a preinstalled one put on PYTHONPATH (never `pip install cupy`);
#      CUPY_SITE=/path/to/site-packages names the folder that holds it;
#   2. installs missing pure-Python test dependencies (pytest, hypothesis, ...) from WHEELDIR, if given, with
#      pip install --no-index --find-links WHEELDIR; tinygpt itself runs from this checkout (PYTHONPATH=.);
#   3. runs `pytest -m gpu` under a deadline that ends it cleanly (SIGINT: pytest still writes its report);
#   4. trains a short `--device cuda` run on the packaged corpus and samples from it;
#   5. runs `tinygpt bench --device cuda` at the cpu and video sizes, with the fused kernels and with
#      TINYGPT_KERNELS=reference (against torch CUDA when torch imports), and with --generate;
#   6. writes every log to LOGDIR and a summary (LOGDIR/summary.txt, also printed).
#
# Without a usable GPU it prints one line and exits 3 at once. Usage errors exit 2; a stage that failed or
# ran out of time makes the exit status 1. Environment: PYTHON (default python3), GPU_CHECK_SECONDS (the
# whole budget, default 450 s), TINYGPT_GPU_CHECK_PLAN=1 (print the stages' commands and run nothing),
# GPU_CHECK_DEVICE=cpu (run the stages on the CPU instead: a check of this script's own plumbing).
set -uo pipefail

usage="usage: scripts/gpu_check.sh LOGDIR [WHEELDIR]"
if [ $# -lt 1 ] || [ $# -gt 2 ] || [ -z "${1:-}" ]; then
    echo "$usage" >&2
    exit 2
fi
LOGDIR=$1
WHEELDIR=${2:-}
if [ -n "$WHEELDIR" ] && [ ! -d "$WHEELDIR" ]; then
    echo "gpu_check: WHEELDIR $WHEELDIR is not a folder; $usage" >&2
    exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_SECONDS:-450}
PLAN=${TINYGPT_GPU_CHECK_PLAN:-}
DEV=${GPU_CHECK_DEVICE:-cuda}
START=$(date +%s)

# --- CuPy: this interpreter's, else a preinstalled one on PYTHONPATH ---------------------------------------
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || {
    echo "gpu_check: cannot run $PY; set PYTHON to a Python 3 interpreter" >&2
    exit 2
}
has_cupy() { "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("cupy") is None)' 2>/dev/null; }
cupy_from=""
if [ -n "${CUPY_SITE:-}" ]; then
    export PYTHONPATH="$PYTHONPATH:$CUPY_SITE"
    cupy_from="CUPY_SITE=$CUPY_SITE"
elif has_cupy; then
    cupy_from="this Python's packages"
else                                # a CuPy that another interpreter of the same version installed
    for d in /usr/local/lib/python"$pyver"/dist-packages /usr/local/lib/python"$pyver"/site-packages \
             /usr/lib/python3/dist-packages /usr/lib/python"$pyver"/site-packages \
             /opt/conda/lib/python"$pyver"/site-packages "$HOME"/.local/lib/python"$pyver"/site-packages \
             /opt/*/lib/python"$pyver"/site-packages /usr/local/*/lib/python"$pyver"/site-packages; do
        if [ -d "$d/cupy" ]; then
            export PYTHONPATH="$PYTHONPATH:$d"
            cupy_from="$d (on PYTHONPATH)"
            break
        fi
    done
fi

# --- dependencies: tinygpt's and the tests', from the wheel folder when one is given ------------------------
MODULES="numpy safetensors tqdm threadpoolctl pytest hypothesis"
missing_modules() {
    local m out=""
    for m in $MODULES; do "$PY" -c "import $m" 2>/dev/null || out="$out $m"; done
    echo "$out"
}
missing=$(missing_modules)
deps_log=$(mktemp)
if [ -n "$missing" ] && [ -n "$WHEELDIR" ]; then
    pip_cmd="$PY -m pip install --no-index --find-links '$WHEELDIR'$missing"
    if [ -n "$PLAN" ]; then
        echo "deps: $pip_cmd"
    else
        bash -c "$pip_cmd || $pip_cmd --break-system-packages" > "$deps_log" 2>&1
        missing=$(missing_modules)
    fi
fi

# --- no usable GPU: one line, at once ------------------------------------------------------------------------
if [ -z "$PLAN" ]; then
    if ! problem=$("$PY" -c 'from tinygpt import backend; print(backend.cuda_problem() or "")' 2>&1); then
        echo "gpu_check: cannot import tinygpt with $PY ($(echo "$problem" | tail -n 1)); missing:$missing;" \
             "give a WHEELDIR that holds them (docs/GPU.md)" >&2
        exit 2
    fi
    if [ -n "$problem" ] && [ "$DEV" = cuda ]; then
        echo "gpu_check: no usable GPU here: $problem"
        exit 3
    fi
fi

SUMMARY=/dev/null
if [ -z "$PLAN" ]; then
    mkdir -p "$LOGDIR" || exit 2
    LOGDIR=$(cd "$LOGDIR" && pwd)
    SUMMARY="$LOGDIR/summary.txt"
    : > "$SUMMARY"
fi
failed=0
say() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME SECONDS COMMAND...: runs COMMAND (through bash -c) with its output in LOGDIR/NAME.log, within
# SECONDS or what is left of the budget; SIGINT at the deadline, SIGKILL 20 s later.
stage() {
    local name=$1 want=$2
    shift 2
    local cmd="$*"
    if [ -n "$PLAN" ]; then
        echo "$name (timeout -s INT -k 20 ${want}s): $cmd"
        return 0
    fi
    local left=$(( BUDGET - ($(date +%s) - START) - 25 ))
    local t=$(( want < left ? want : left ))
    if [ "$t" -lt 15 ]; then
        say "$name: SKIPPED (out of time)"
        failed=1
        return 1
    fi
    local t0 rc
    t0=$(date +%s)
    (cd "$REPO" && timeout -s INT -k 20 "$t" bash -c "$cmd") > "$LOGDIR/$name.log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 0 ]; then
        say "$name: ok (${took} s)"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        say "$name: TIMED OUT after ${t} s (log: $name.log)"
        failed=1
    else
        say "$name: FAILED, exit $rc (${took} s; log: $name.log)"
        failed=1
    fi
    return "$rc"
}

if [ -z "$PLAN" ] && [ "$DEV" = cuda ]; then
    say "tinygpt GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)"
    say "CuPy from: $cupy_from"
    "$PY" - >> "$SUMMARY" 2>&1 <<'EOF'
import platform
import cupy as cp
from tinygpt import backend
dev = cp.cuda.Device()
props = cp.cuda.runtime.getDeviceProperties(dev.id)
print(f"GPU: {props['name'].decode()} (sm_{props['major']}{props['minor']}, "
      f"{props['totalGlobalMem'] / 2 ** 30:.0f} GiB), {cp.cuda.runtime.getDeviceCount()} visible")
print(f"driver CUDA {cp.cuda.runtime.driverGetVersion()}, runtime CUDA {cp.cuda.runtime.runtimeGetVersion()}, "
      f"CuPy {cp.__version__}, Python {platform.python_version()}")
try:
    import torch
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, available: {torch.cuda.is_available()})")
except ImportError:
    print("torch: not installed (the benchmarks run tinygpt alone)")
EOF
    tail -n 3 "$SUMMARY"
    nvidia-smi > "$LOGDIR/nvidia-smi.txt" 2>&1 || true
fi

[ -s "$deps_log" ] && [ -z "$PLAN" ] && cp "$deps_log" "$LOGDIR/deps.log"
rm -f "$deps_log"
[ -n "$missing" ] && [ -z "$PLAN" ] && say "missing Python packages:$missing (bring their wheels: docs/GPU.md)"

# --- the stages -----------------------------------------------------------------------------------------------
timeout_flag=$("$PY" -c 'import pytest_timeout' 2>/dev/null && echo "--timeout=150" || true)
stage pytest_gpu 180 "$PY -m pytest -m gpu -p no:cacheprovider -rfEs --durations=15 $timeout_flag" \
    "--continue-on-collection-errors --junitxml='$LOGDIR/pytest_gpu.xml' tests"
stage train 80 "$PY -m tinygpt train --device $DEV --data shakespeare --preset video --max-iters 300" \
    "--eval-interval 100 --eval-iters 10 --batch-size 32 --no-progress --out-dir '$LOGDIR/train_run' &&" \
    "$PY -m tinygpt sample --device $DEV --out-dir '$LOGDIR/train_run' --max-new-tokens 300"
for preset in cpu video; do
    stage "bench_${preset}_fused" 40 \
        "$PY -m tinygpt bench --device $DEV --preset $preset --json > '$LOGDIR/bench_${preset}_fused.json'"
    stage "bench_${preset}_reference" 40 \
        "TINYGPT_KERNELS=reference $PY -m tinygpt bench --device $DEV --preset $preset --json" \
        "> '$LOGDIR/bench_${preset}_reference.json'"
done
stage bench_generate 40 "$PY -m tinygpt bench --device $DEV --generate --json > '$LOGDIR/bench_generate.json'"
[ -n "$PLAN" ] && exit 0

# --- the summary -------------------------------------------------------------------------------------------------
"$PY" - "$LOGDIR" >> "$SUMMARY" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
import xml.etree.ElementTree as ET
log = Path(sys.argv[1])
junit = log / "pytest_gpu.xml"
if junit.exists():
    root = ET.parse(junit).getroot()
    s = root if root.tag == "testsuite" else root.find("testsuite")
    print(f"pytest -m gpu: {s.get('tests')} tests, {s.get('failures')} failed, {s.get('errors')} errors, "
          f"{s.get('skipped')} skipped, {float(s.get('time', 0)):.0f} s")
for line in (log / "train.log").read_text(errors="replace").splitlines() if (log / "train.log").exists() else []:
    if line.startswith(("step ", "tinygpt: done")):
        print("train:", line)
for name in ("cpu_fused", "cpu_reference", "video_fused", "video_reference"):
    f = log / f"bench_{name}.json"
    try:
        r = json.loads(f.read_text().strip().splitlines()[-1])
    except Exception:
        print(f"bench {name}: no result")
        continue
    parts = [f"bench {name} (batch {r['batch_size']}, matmul peak {r['matmul_peak_gflops']} GFLOP/s):"]
    for fw in ("tinygpt", "torch"):
        if fw in r:
            t = r[fw]
            parts.append(f"{fw} {t['ms_per_step']} ms/step, {t['tokens_per_s']:,.0f} tok/s, MFU {t['mfu']}, "
                         f"peak {t.get('peak_mem_mb')} MiB;")
    if "speed_ratio_vs_torch" in r:
        parts.append(f"speed vs torch {r['speed_ratio_vs_torch']}x")
    print(" ".join(parts))
f = log / "bench_generate.json"
if f.exists() and f.read_text().strip():
    r = json.loads(f.read_text().strip().splitlines()[-1])
    print(f"generate: {r['tokens_per_s_cached']} tok/s cached, {r['tokens_per_s_uncached']} uncached, "
          f"identical tokens: {r['identical_tokens']}")
EOF
say "total $(( $(date +%s) - START )) s; logs in $LOGDIR"
echo "----- $SUMMARY -----"
cat "$SUMMARY"
exit "$failed"
