#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install fairseq-qplugin with everything it
# needs: torch (CPU build, pinned in constraints.txt), fairseq, sacrebleu, sentencepiece, subword-nmt,
# pytest, ctranslate2 (the extras recipes, plot, bench, test). Safe to re-run: dependencies are
# reinstalled only when pyproject.toml, setup.py or constraints.txt change;
# the plugin itself is reinstalled each time (a few seconds) so the venv matches the working tree.
#
#   bash scripts/setup_env.sh            # uses .venv/ in the repo, or $QPLUGIN_VENV
#   PYTHON=python3.11 bash scripts/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${QPLUGIN_VENV:-.venv}
python=${PYTHON:-python3}
log() { echo "$(date '+%F %T') | setup | $*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
    log "creating virtual environment $venv with $($python --version 2>&1)"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
stamp="$venv/.qplugin-deps"
want=$(cat pyproject.toml setup.py constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing dependencies (the first time builds fairseq from source: about 4 minutes)"
    "${pip[@]}" install -q --upgrade pip setuptools wheel
    "${pip[@]}" install -q -c constraints.txt '.[recipes,plot,bench,test]'
    echo "$want" > "$stamp"
fi
log "installing the plugin from the working tree"
"${pip[@]}" install -q --no-deps --no-build-isolation --force-reinstall . 2>&1 | grep -v "^$" >&2 || true
# The same C++ kernels inside the working tree too: the tests, the demo and `--user-dir fairseq_qplugin`
# from the repository root import the package from here, not from site-packages (reuses build/).
# Only when the sources are newer than the built library: copying it again would rewrite a file that
# running trainings (e.g. scripts/methods.sh rows started side by side) have loaded.
so=$(ls fairseq_qplugin/pack/_qkernels*.so 2>/dev/null | head -n 1 || true)  # none yet in a fresh clone
if [ -z "$so" ] || [ -n "$(find setup.py fairseq_qplugin/pack/csrc -newer "$so" 2>/dev/null)" ]; then
    "$venv/bin/python" setup.py -q build_ext --inplace 2>&1 | grep -iE "error|warning: fairseq-qplugin" >&2 || true
fi
"$venv/bin/python" -c "import fairseq_qplugin" 2>/dev/null || { log "ERROR: fairseq_qplugin does not import"; exit 1; }
log "packed-weight kernels: $("$venv/bin/python" -c 'from fairseq_qplugin.pack import kernels as k
print("C++ (" + ", ".join(k.extension_isas()) + ")" if k.extension_isas() else "pure torch (the C++ extension was not built)")' 2>/dev/null)"
log "ready: $venv ($("$venv/bin/python" -c 'import torch, fairseq; print("torch", torch.__version__, "fairseq", fairseq.__version__)'))"
