#!/usr/bin/env bash
# Build the GPU-check kit in .gpu/ (git-ignored) and print the two device `run` calls for it.
# Run here, from anywhere: bash bench/gpu_check/prepare.sh
#
# The device (one H200; Python 3.12 with torch, numpy, pandas, pyarrow, rich, ...; no Ray; no
# internet) takes at most 64 MiB per call, working tree included, and Ray's wheel alone is ~76 MiB.
# So the kit travels in two halves, and run.sh joins them there:
#   .gpu/part1: the head of Ray's wheel                                    - call 1 carries it; it stays
#   .gpu/part2: its tail, the other wheels, the 4 Fashion-MNIST .gz files   - call 2 carries it
#
# Dependency check on a CPU stand-in of the device (a venv of device packages only, no Ray): get
# the same wheels for its Python, install them with pip --no-deps --target DIR, and dry-run
# run.sh with PYTHONPATH=DIR SKIP_WHEELS=1 (its "versions" step prints any unmet requirement):
#   PY_VERSION=3.11 bash bench/gpu_check/prepare.sh --wheels-only /tmp/wheels311
set -euo pipefail
cd "$(dirname "$0")/../.."

PY_VERSION=${PY_VERSION:-3.12}  # the device's python3 is 3.12.3
# Ray as in .venv, and what its core, [train] and [data] requirements need that the device lacks
# (its package list: /work/.library/device/KINDS.md). The rest (numpy, pandas, pyarrow, fsspec,
# msgpack, protobuf, click, filelock, packaging, pyyaml, requests, attrs, typing-extensions, torch)
# is there already and must not be shadowed by a second copy.
WHEELS=(
  ray==2.60.0
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1  # core
  tensorboardX==2.6.5                                                                           # [train]
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5       # [train]; ray.train imports it
)
# pydantic 2.14 asks for typing-extensions>=4.16.0, which the device has most likely (numpy 2.5
# there is newer than ours); run.sh installs this copy only if the device's is older.
FALLBACK=(typing-extensions==4.16.0)
DATA=/usr/share/datasets/fashion-mnist
LIMIT=$((60 * 1024 * 1024))  # per call, of the 64 MiB the device tool takes, leaving some slack

download() {  # download DIR WHEEL...: wheels for CPython $PY_VERSION on x86-64 Linux, without their deps
  local dir=$1
  shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "$@"
}
if [[ ${1:-} == --wheels-only ]]; then
  download "${2:?usage: prepare.sh --wheels-only DIR}" "${WHEELS[@]}" && ls -l "$2" && exit 0
fi

grep -qx '/.gpu/' .gitignore || { echo "add /.gpu/ to .gitignore first: .gpu/ must not travel as tracked files" >&2; exit 1; }
rm -rf .gpu && mkdir -p .gpu/dl .gpu/part1 .gpu/part2/data
download .gpu/dl "${WHEELS[@]}"
download .gpu/part2/fallback "${FALLBACK[@]}"
cp "$DATA"/*-ubyte.gz .gpu/part2/data/
ray=$(cd .gpu/dl && ls ray-*.whl)
(cd .gpu/dl && sha256sum "$ray") >.gpu/part2/ray.sha256  # run.sh checks the join (a stale part1 fails here)
mv .gpu/dl/"$ray" .gpu/ray.whl
mv .gpu/dl/*.whl .gpu/part2/
rmdir .gpu/dl

# Split Ray's wheel so that the two parts weigh the same: part1 = its head, part2 = the rest.
bytes() { du -cb "$@" | tail -1 | cut -f1; }
head_bytes=$(( ($(bytes .gpu/ray.whl .gpu/part2) + 1) / 2 ))
split -b "$head_bytes" -d -a 1 .gpu/ray.whl .gpu/ray.whl.
mv .gpu/ray.whl.0 ".gpu/part1/$ray.0" && mv .gpu/ray.whl.1 ".gpu/part2/$ray.1" && rm .gpu/ray.whl

# What travels in each call: the working tree (tracked + untracked, not ignored) plus the part.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
status=0
for p in part1 part2; do
  total=$((tree + $(bytes .gpu/$p)))
  echo "call with .gpu/$p: $(mib "$total") ($(mib "$tree") working tree + $(mib $((total - tree))) .gpu/$p)"
  ((total < LIMIT)) || { echo "  too big: over $(mib $LIMIT)" >&2; status=1; }
done
ls -lR .gpu
((status == 0)) || exit $status

cat <<'EOF'

Kit ready. On a session lent a GPU machine, make these two device `run` calls, the second AT ONCE
after the first returns: the machine stays warm ~30 s, and only a warm one keeps .gpu/part1.

Call 1 (starts the machine, leaves .gpu/part1 on it; prints the GPU and versions run.sh relies on):
  carry:     [".gpu/part1"]
  timeout_s: 120
  command:   ls -la .gpu/part1 && nvidia-smi -L && python3 -m pip list 2>/dev/null | grep -iE '^(torch|numpy|pandas|pyarrow|typing.extensions|protobuf|msgpack|attrs|packaging) '

Call 2 (joins and installs Ray, then every step of run.sh on the GPU; it took 287 s on 2026-12-04):
  carry:     [".gpu/part2"]
  timeout_s: 480
  command:   bash bench/gpu_check/run.sh

Call 2's output ends with the summary; $OUT brings back gpu_check.log, summary.json, history.csv,
loss_curve.png, evaluation.json, confusion_matrix.png (and ray_logs.tgz on failure). If it says
.gpu/part1 is missing, the machine was not warm any more: make both calls again. Then give_back.
EOF
