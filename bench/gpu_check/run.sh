#!/usr/bin/env bash
# GPU check: train 5 epochs with Ray Train on the GPU, score the 10,000 test images with Ray Data
# on it, evaluate the predictions and check them against a CPU forward pass (check_predictions.py),
# time the model step alone (model_step.py) and a 1M-row Parquet scoring job, then print train
# s/epoch, start-up, scoring images/s and GPU memory (summary.py).
#
# On the device (H200, no Ray, no internet), after `bash bench/gpu_check/prepare.sh` here (which
# prints these calls), two `run` calls, the second at once after the first: only a machine still
# warm from call 1 (~30 s) keeps .gpu/part1, an ignored path that call 2 does not carry.
#   1. carry [".gpu/part1"], timeout_s 120: something trivial, e.g. ls -la .gpu/part1 && nvidia-smi -L
#   2. carry [".gpu/part2"], timeout_s 480: bash bench/gpu_check/run.sh
# Local dry run on CPU (needs the kit's data, so prepare.sh first):
#   OUT=/tmp/gpucheck-out GPU_FLAG=--no-gpu SKIP_WHEELS=1 PYTHON=.venv/bin/python EPOCHS=1 ROWS=20000 bash bench/gpu_check/run.sh
#
# Settings (environment): OUT (required; the device sets it), PYTHON (python3), GPU_FLAG
# (--use-gpu; --no-gpu for CPU), SKIP_WHEELS (1: Ray is importable already), EPOCHS (5),
# MIN_ACCURACY (0.75: a GPU run that learns nothing fails), ROWS (1000000), STEP_TIMEOUT (240 s per step),
# WORK (/tmp/gpu_check_work: run directory and predictions; too many files to come back in $OUT).
# Exit status: 0 when every step passed, else the failed step's (3: the kit is incomplete).
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${OUT:?set OUT to a directory for the log and results}"
PYTHON=${PYTHON:-python3}
GPU_FLAG=${GPU_FLAG:---use-gpu}
EPOCHS=${EPOCHS:-5}
MIN_ACCURACY=${MIN_ACCURACY:-0.75}
ROWS=${ROWS:-1000000}  # rows of the Parquet scoring job and of model_step.py
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
WORK=${WORK:-/tmp/gpu_check_work}
SITE=/tmp/site
export FMNIST_DATA_DIR=${FMNIST_DATA_DIR:-$PWD/.gpu/part2/data}
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0  # no internet there: no usage-stats upload
export COLUMNS=${COLUMNS:-160}  # rich wraps at 80 columns off a terminal, splitting the lines we parse

step() {  # step NAME COMMAND...: run it (a program under a time limit), log its output and wall time
  local name=$1 t0 rc=0 sampler="" limit=(timeout -k 10 "$STEP_TIMEOUT")
  shift
  declare -F "$1" >/dev/null && limit=()  # a shell function: timeout cannot run one
  echo; echo "=== $name: $*"
  if command -v nvidia-smi >/dev/null; then  # GPU memory in use, every 0.2 s, for the summary's peak
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$WORK/$name.gpu_mib" 2>/dev/null &
    sampler=$!
  fi
  t0=$(date +%s.%N)
  "${limit[@]}" "$@" 2>&1 | stamp "$WORK/$name.stamped" | tee "$WORK/$name.out" || rc=$?
  awk -v n="$name" -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%s %.2f\n", n, b - a}' >>"$WORK/wall_seconds.txt"
  [[ -z $sampler ]] || kill "$sampler" 2>/dev/null || true
  ((rc != 124)) || echo "=== $name: over STEP_TIMEOUT=$STEP_TIMEOUT s"
  ((rc == 0)) || { echo "=== $name FAILED (exit $rc)"; echo "failed: $name $rc" >>"$WORK/failed.txt"; return "$rc"; }
}

stamp() {  # stamp FILE: pass stdin through, and write each line to FILE after the seconds since the start
  python3 -u -c 'import sys, time
start, stamped = time.monotonic(), open(sys.argv[1], "w")
for line in sys.stdin:
    sys.stdout.write(line)
    stamped.write(f"{time.monotonic() - start:.2f} {line}")
    stamped.flush()' "$1"
}

# Join Ray's wheel from the two parts, and install the kit's wheels into $SITE. Every command is
# checked by hand: step runs this where bash ignores set -e.
install_wheels() {
  [[ -d .gpu/part1 ]] || {
    echo ".gpu/part1 is missing: the machine was not warm from call 1. Make both calls again, back to back."
    return 3
  }
  [[ -f .gpu/part2/ray.sha256 ]] || { echo ".gpu/part2 is missing: carry it"; return 3; }
  local dir=/tmp/gpu_check_wheels ray
  ray=$(cut -d' ' -f3 .gpu/part2/ray.sha256)
  rm -rf "$SITE" "$dir" && mkdir -p "$dir" && cat ".gpu/part1/$ray.0" ".gpu/part2/$ray.1" >"$dir/$ray" || return 3
  (cd "$dir" && sha256sum -c --quiet) <.gpu/part2/ray.sha256 || {
    echo "Ray's wheel does not join: .gpu/part1 is from another prepare.sh run; make both calls again"
    return 3
  }
  # The fallback typing-extensions only where the device's is older than pydantic asks for.
  local fallback=()
  "$PYTHON" -c 'import sys, importlib.metadata as m, packaging.version as v
sys.exit(v.Version(m.version("typing_extensions")) < v.Version("4.16.0"))' || fallback=(.gpu/part2/fallback/*.whl)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$dir"/*.whl .gpu/part2/*.whl "${fallback[@]}"
}

main() {
  set -euo pipefail  # again: main runs in the pipeline's subshell, where the caller turned -e off
  rm -rf "$WORK" && mkdir -p "$WORK"
  echo "GPU check $(date -u +%FT%TZ): GPU_FLAG=$GPU_FLAG EPOCHS=$EPOCHS PYTHON=$PYTHON data=$FMNIST_DATA_DIR"
  if [[ ${SKIP_WHEELS:-0} != 1 ]]; then
    step install install_wheels
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  fi
  # The repo root: Ray's worker processes import fmnist too, and it is not installed there.
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

  command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "(no nvidia-smi)"
  step versions "$PYTHON" - "$GPU_FLAG" <<'EOF'
import importlib.util, os, sys
from importlib import metadata as md
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# Unmet requirements of the packages installed beside Ray (Ray's own with its extras train, data).
site = os.path.dirname(os.path.dirname(importlib.util.find_spec("ray").origin))
for dist in sorted({canonicalize_name(d.metadata["Name"]) for d in md.distributions(path=[site])}):
    extras = ("", "train", "data") if dist == "ray" else ("",)
    for r in map(Requirement, md.requires(dist) or []):
        if r.marker and not any(r.marker.evaluate({"extra": e}) for e in extras):
            continue
        try:
            have = md.version(r.name)
        except md.PackageNotFoundError:
            have = None
        if have is None or not r.specifier.contains(have, prereleases=True):
            print(f"WARNING: {dist} needs {r}: {'missing' if have is None else 'found ' + have}")

import numpy, pandas, pyarrow, torch, ray
print(f"python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"numpy {numpy.__version__}; pandas {pandas.__version__}; pyarrow {pyarrow.__version__}")
print(f"ray {ray.__version__} from {ray.__file__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"torch.cuda: {torch.cuda.device_count()} device(s); 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, "
          f"capability {p.major}.{p.minor}")
    from ray._private.accelerators import NvidiaGPUAcceleratorManager as M  # what Ray will offer
    print(f"Ray sees {M.get_current_node_num_accelerators()} NVIDIA GPU(s)")
else:
    print("torch.cuda: not available")
    sys.exit(1 if sys.argv[1] == "--use-gpu" else 0)  # fail now, not inside Ray
EOF

  # The workflow scripts, as a user runs them (the package is not installed there). Training must
  # pass; after it, a failed step is recorded (failed.txt) and the independent ones still run.
  step train "$PYTHON" workflows/train.py --epochs "$EPOCHS" --num-workers 1 "$GPU_FLAG" \
    --storage-path "$WORK/runs" --name gpu
  cp "$WORK/runs/gpu/history.csv" "$WORK/runs/gpu/loss_curve.png" "$OUT/"
  local failed=0 run="$WORK/runs/gpu"

  # score has --use-gpu but no --no-gpu; with --use-gpu it runs one model actor per GPU.
  local score_gpu=()
  [[ $GPU_FLAG == --use-gpu ]] && score_gpu=(--use-gpu)
  if step score "$PYTHON" workflows/score.py --checkpoint "$run" --input test --output "$WORK/predictions" \
    "${score_gpu[@]}"; then
    step evaluate "$PYTHON" workflows/evaluate.py "$WORK/predictions" --json "$OUT/evaluation.json" \
      --plot "$OUT/confusion_matrix.png" --min-accuracy "$MIN_ACCURACY" || failed=$?
    step agree "$PYTHON" bench/gpu_check/check_predictions.py "$run" "$WORK/predictions" || failed=$?
  else
    failed=1
  fi
  step model_step "$PYTHON" bench/gpu_check/model_step.py "$run" --rows "$ROWS" || failed=$?
  # The README's main command as it is: no GPU option, so it must find the GPU by itself.
  step pipeline "$PYTHON" workflows/pipeline.py --storage-path "$WORK/runs" --name pipeline || failed=$?

  # The whole Ray Data job on ROWS rows of Parquet (the test set repeated), at the default batch size and a larger one.
  step input_1m "$PYTHON" -c 'import sys; sys.path.insert(0, "bench"); from pathlib import Path
from bench_scoring import write_input; write_input(Path(sys.argv[1]), int(sys.argv[2]))' "$WORK/input_1m.parquet" "$ROWS" &&
    for batch in 1024 8192; do
      step "score_1m$([[ $batch == 1024 ]] || echo "_b$batch")" "$PYTHON" workflows/score.py --checkpoint "$run" \
        --input "$WORK/input_1m.parquet" --output "$WORK/predictions_1m_$batch" --batch-size "$batch" \
        "${score_gpu[@]}" || failed=$?
    done || failed=$?

  step summary "$PYTHON" bench/gpu_check/summary.py "$WORK" "$OUT" "$GPU_FLAG" || failed=$?
  return "$failed"
}

mkdir -p "$OUT"
started=$(mktemp)  # to tell this run's Ray logs from an earlier run's
set +e  # keep going after a failure, to save Ray's logs and report the status
main 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
set -e
if ((rc != 0)); then
  # Ray's own logs say why a worker or actor died; one archive, as $OUT brings back few files.
  [[ /tmp/ray/session_latest -nt $started ]] && { tar czf "$OUT/ray_logs.tgz" -C /tmp/ray session_latest/logs || true; }
  echo "GPU CHECK FAILED (exit $rc); log: $OUT/gpu_check.log" | tee -a "$OUT/gpu_check.log"
else
  echo "GPU CHECK PASSED; results in $OUT" | tee -a "$OUT/gpu_check.log"
fi
rm -f "$started"
exit "$rc"
