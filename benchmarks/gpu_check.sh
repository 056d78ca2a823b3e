#!/usr/bin/env bash
# Everything a lent NVIDIA H100/H200 must check, in one command of at most 8 minutes:
#   1. device:  the GPU, driver and software stack;
#   2. build:   the CUDA extension, just in time (fastdd._ext.build);
#   3. tests:   the GPU tests of the ops and of the extension (the Triton kernels compiled on the device);
#   4. ops:     the per-op benchmark (benchmarks/ops_bench.py) against the measured matmul rate and copy
#               bandwidth, torch.compile of each reference, and Liger-Kernel's and cut-cross-entropy's fused
#               linear cross-entropy where their wheels came along (.gpu-wheels: run
#               scripts/fetch_gpu_wheels.sh first and carry the folder; stage "wheels" installs them);
#   5. methods: the imagenet1k profile of benchmarks/run.py within the time left.
# Everything goes under one results folder (default benchmarks/results/gpu-<date>), each stage's output in
# <stage>.log, the stage table in stages.tsv, and a one-screen summary in summary.txt (also printed).
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS]   # on the GPU machine (default 450 s)
#   bash benchmarks/gpu_check.sh --dry-run [--out DIR]            # every stage at a tiny size on the CPU
#
# The dry run is what tests/test_gpu_check.py runs, so that the script cannot first fail on the GPU.
# A stage that fails is recorded and the next stages still run; the exit code is 1 when any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=""
BUDGET=450
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        --budget) BUDGET="$2"; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ -z "$OUT" ]; then
    if [ "$DRY" = 1 ]; then OUT=$(mktemp -d); else OUT="benchmarks/results/gpu-$(date +%Y-%m-%d)"; fi
fi
mkdir -p "$OUT"
START=$(date +%s)
printf 'stage\texit\tseconds\n' > "$OUT/stages.tsv"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage NAME LIMIT_SECONDS COMMAND...: run it under a time limit, record exit code and duration
stage() {
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    if [ "$limit" -lt 10 ]; then
        echo "skipped: no time left" > "$OUT/$name.log"; rc=124
    else
        timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; rc=$?
    fi
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/stages.tsv"
    echo "gpu_check: $name exit $rc ($(( $(date +%s) - t0 )) s)"
}

# the neighbouring fused cross-entropies (Liger-Kernel, cut-cross-entropy) for the ops stage: installed from
# .gpu-wheels (scripts/fetch_gpu_wheels.sh, carried to the GPU machine) into a scratch folder, if present
SITE=$(mktemp -d)
if ls .gpu-wheels/*.whl > /dev/null 2>&1; then
    stage wheels 60 "$PY" -m pip install --no-deps --no-index --target "$SITE" .gpu-wheels/*.whl
else
    stage wheels 60 echo "no .gpu-wheels: Liger-Kernel and cut-cross-entropy are skipped (scripts/fetch_gpu_wheels.sh)"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 1 ]; then
    stage device 60 "$PY" -c "import torch, fastdd; print('torch', torch.__version__, 'fastdd', fastdd.__version__, 'cuda', torch.cuda.is_available())"
    stage build 60 "$PY" -c "from fastdd import _ext; s = _ext.sources(); assert s, 'no sources'; print(len(s), 'sources; CUDA home', _ext.find_cuda_home())"
    stage tests 300 "$PY" -m pytest -q -p no:cacheprovider -m "not interpreter" tests/test_ops_class_centers.py
    stage ops 300 "$PY" benchmarks/ops_bench.py --quick --device cpu --ops class_centers --backends torch --reps 2 --warmup 1 --out "$OUT/ops"
    stage methods 300 "$PY" benchmarks/run.py --profile imagenet1k --tiny --in-process --quiet --no-plots --device cpu --out "$OUT/run"
else
    stage device 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv && $PY -c 'import torch, triton, fastdd; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"fastdd\", fastdd.__version__, torch.cuda.get_device_name())'"
    stage build 150 "$PY" -c "from fastdd import _ext; m = _ext.build(); print('built', m.__file__)"
    stage tests 150 "$PY" -m pytest -q -p no:cacheprovider -m "not interpreter" tests/test_ops_class_centers.py tests/test_ops_flow_matching.py tests/test_ops_linear_cross_entropy.py tests/test_ops_linear_head_gradient.py tests/test_ops_ridge_probe.py tests/test_ops_backend.py tests/test_cuda_extension.py
    stage ops "$(( $(left) - 150 ))" "$PY" benchmarks/ops_bench.py --max-seconds "$(( $(left) - 170 ))" --out "$OUT/ops"
    stage methods "$(( $(left) - 10 ))" "$PY" benchmarks/run.py --profile imagenet1k --quiet --max-total-seconds "$(( $(left) - 25 ))" --out "$OUT/run"
fi

"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import csv, glob, json, os, sys
out = sys.argv[1]
print(f"fastdd GPU check: {out}")
rows = list(csv.DictReader(open(os.path.join(out, "stages.tsv")), delimiter="\t"))
for r in rows:
    print(f"  {r['stage']:<8} {'ok' if r['exit'] == '0' else 'FAILED (exit ' + r['exit'] + ')':<18} {r['seconds']:>4} s")
for path in sorted(glob.glob(os.path.join(out, "ops", "*.json")))[-1:]:
    ops = json.load(open(path))
    c = ops.get("ceilings") or {}
    if c.get("matmul") and c.get("copy"):
        print(f"  ceilings: matmul {c['matmul']['tflops']:.1f} TFLOP/s, copy {c['copy']['gbytes_per_s']:.0f} GB/s")
    for t in ops.get("targets", []):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t.get("met")]
        value = "" if t.get("value") is None else f" ({t['value']:.2f})"
        print(f"  target {t['op']} {t['variant']} ({t['backend']}) {t['check']}: {verdict}{value}")
for path in sorted(glob.glob(os.path.join(out, "run", "*.md")))[-1:]:
    lines = open(path).read().splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    print("\n".join(lines[first:end]))  # the methods table
failed = [r["stage"] for r in rows if r["exit"] != "0"]
print("all stages ok" if not failed else f"failed stages: {', '.join(failed)} (see <stage>.log)")
sys.exit(1 if failed else 0)
EOF
