#!/usr/bin/env bash
# The package as a newcomer gets it (CI runs this after the tests):
#   1. build the wheel from a copy of this checkout (tracked and untracked files, not ignored ones)
#      with `pip wheel` in an isolated build: no torch at build time, so the runtime engine is
#      compiled as a plain shared library and the torch C++ kernels are left out (pure-torch fallback),
#   2. install it with its dependencies into a new virtual environment (torch pinned by constraints.txt),
#   3. check the installed package from outside the repository: version, location, CPU torch, the
#      engine loads as installed (not rebuilt), the console scripts run,
#   4. with a trained fp32 checkpoint: run the five-minute start (scripts/quickstart.sh and the recipes
#      of the copy) against the installed package, and check both BLEU scores against MIN_BLEU if set.
#
#   bash scripts/install_check.sh [CHECKPOINT DATA_BIN RAW_REF]
#
# PYTHON (default python3) makes the environment; QPLUGIN_INSTALL_DIR (default: a new temporary
# directory, removed at the end) holds the copy, the wheel, the environment and the quickstart's files.
# Each step prints its wall time.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
if [ -n "${QPLUGIN_INSTALL_DIR:-}" ]; then
    work=$QPLUGIN_INSTALL_DIR
    mkdir -p "$work"
else
    work=$(mktemp -d "${TMPDIR:-/tmp}/qplugin-install.XXXXXX")
    trap 'rm -rf "$work"' EXIT
fi
work=$(cd "$work" && pwd)
log() { echo "$(date '+%F %T') | install-check | $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
t=$(date +%s)
lap() { local now; now=$(date +%s); dt=$(( now - t )); t=$now; }  # sets dt: seconds since the last lap

if [ $# -ge 3 ]; then  # absolute paths: the quickstart runs from $work
    for f in "$1" "$2" "$3"; do [ -e "$f" ] || die "$f does not exist"; done
    ckpt=$(realpath "$1") bin=$(realpath "$2") ref=$(realpath "$3")
fi

log "1/4 isolated wheel build (pip wheel) from a copy of $repo"
rm -rf "$work/src" "$work/dist"
mkdir -p "$work/src"
(cd "$repo" && git ls-files -co --exclude-standard -z |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |  # not files deleted since
    tar --null -T - -cf -) | tar -C "$work/src" -xf -
"$python" -m pip wheel --no-deps -w "$work/dist" "$work/src" > "$work/wheel.log" 2>&1 ||
    { tail -n 30 "$work/wheel.log" >&2; die "the wheel did not build (log: $work/wheel.log)"; }
whl=$(ls "$work"/dist/fairseq_qplugin-*.whl)
"$python" -m zipfile -l "$whl" > "$work/wheel.list"  # a file, not a pipe: grep -q would close it early
grep -q "fairseq_qruntime/_engine.so " "$work/wheel.list" || die "$whl holds no runtime engine"
lap; log "built $(basename "$whl") in $dt s"

log "2/4 new virtual environment, the wheel with its dependencies (-c constraints.txt)"
rm -rf "$work/venv"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check -c "$repo/constraints.txt" "$whl[recipes]" \
    > "$work/install.log" 2>&1 || { tail -n 30 "$work/install.log" >&2; die "the install failed"; }
lap; log "installed in $dt s"

log "3/4 the installed package, from $work"
cd "$work"
export PATH="$work/venv/bin:$PATH"
plugin=$(python - "$work/venv" "$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$repo/fairseq_qplugin/__init__.py")" <<'EOF'
import logging, os, sys
import torch
import fairseq_qplugin
from fairseq_qplugin.pack import kernels
from fairseq_qruntime import load_library

venv, version = sys.argv[1:]
here = os.path.dirname(fairseq_qplugin.__file__)
assert here.startswith(os.path.realpath(venv)), f"fairseq_qplugin imported from {here}, not from {venv}"
assert fairseq_qplugin.__version__ == version, (fairseq_qplugin.__version__, version)
assert torch.__version__.startswith("2.13.0") and torch.version.cuda is None, f"torch {torch.__version__} (want 2.13.0 CPU)"
load_library(build_if_missing=False)  # the engine the wheel holds, used as installed
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
print(f"fairseq_qplugin {version} at {here}; torch {torch.__version__}; packed-weight kernels: "
      f"{kernels.resolve_backend()}; runtime engine loaded", file=sys.stderr)
print(here)
EOF
) || die "the installed package failed its checks"
for cmd in fairseq-qpack fairseq-qtranslate fairseq-qallocate; do
    "$cmd" --help > "$work/$cmd.help" 2>&1 || { cat "$work/$cmd.help" >&2; die "$cmd --help failed"; }
done
lap; log "checked in $dt s"

if [ -z "${ckpt:-}" ]; then
    log "4/4 skipped: no fp32 checkpoint given (bash scripts/install_check.sh CHECKPOINT DATA_BIN RAW_REF)"
    exit 0
fi
log "4/4 the five-minute start against the installed package"
QPLUGIN_VENV="$work/venv" QPLUGIN_USER_DIR="$plugin" bash "$work/src/scripts/quickstart.sh" "$ckpt" "$bin" "$ref" "$work/quickstart"
ptq=$(cat "$work/quickstart/gen-ptq-int8/bleu.txt") qat=$(cat "$work/quickstart/gen-qat-int4/bleu.txt")
lap; log "quickstart in $dt s: post-training 8-bit BLEU $ptq, 4-bit QAT BLEU $qat"
if [ -n "${MIN_BLEU:-}" ]; then
    python -c "import sys; sys.exit(min(float(sys.argv[1]), float(sys.argv[2])) < float(sys.argv[3]))" "$ptq" "$qat" "$MIN_BLEU" ||
        die "BLEU $ptq / $qat below MIN_BLEU=$MIN_BLEU"
fi
