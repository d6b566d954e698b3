#!/usr/bin/env bash
# The demo: on the shipped en-de corpus (data/debian-doc-en-de), train a small fp32 transformer on
# the CPU, fine-tune it with quantization-aware training to 8-bit and 4-bit weights
# (transformer_int8), translate the 1000-sentence test set with each, score with sacrebleu, and print
# a table (BLEU, delta vs fp32, average weight bits, packed size).
#
#   bash scripts/demo.sh            # everything, about 20 minutes on 2 CPU cores after set-up
#   bash scripts/demo.sh --check    # also fail unless 8-bit loses <= 0.3 BLEU and 4-bit <= 1.0
#                                   # against the fp32 checkpoint they start from
#
# Environment: DEMO_DIR (default exp/demo) holds every step's output; steps already done are
# skipped, so an interrupted demo resumes. FP32_UPDATES / QAT_UPDATES change the training length.
set -euo pipefail
cd "$(dirname "$0")/.."
check=0
for arg in "$@"; do
    case $arg in
        --check) check=1 ;;
        -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "demo.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
    esac
done
bash scripts/setup_env.sh
venv=${QPLUGIN_VENV:-.venv}
export PATH="$PWD/$venv/bin:$PATH"
exp=${DEMO_DIR:-exp/demo}
start=$(date +%s)
log() { echo "$(date '+%F %T') | demo | $*" >&2; }

source scripts/demo_model.sh  # the model size and fp32 training schedule, shared with scripts/methods.sh

log "1/4 sentencepiece + binarize the corpus"
recipes/prepare_corpus.sh --src-dir data/debian-doc-en-de --out "$exp/data" --vocab-size 8000

log "2/4 train the fp32 model"
recipes/train.sh --data "$exp/data/bin" --save-dir "$exp/fp32" --arch transformer "${fp32_schedule[@]}" \
    -- "${model[@]}"

log "3/4 quantization-aware fine-tuning: 8-bit and 4-bit weights"
for bits in 8 4; do
    recipes/train.sh --data "$exp/data/bin" --save-dir "$exp/int8-w$bits" --arch transformer_int8 \
        --finetune-from "$exp/fp32/checkpoint_best.pt" "${qat_schedule[@]}" -- "${model[@]}" --quant-bits "$bits"
done

log "4/4 translate the test set (beam 5) and score with sacrebleu"
rows=()
for name in fp32 int8-w8 int8-w4; do
    recipes/generate.sh --data "$exp/data/bin" --checkpoint "$exp/$name/checkpoint_best.pt" \
        --raw-ref "$exp/data/raw/test.de" --out "$exp/gen/$name" --beam 5
    rows+=("$name=$exp/$name/checkpoint_best.pt:$exp/gen/$name")
done
python -m fairseq_qplugin.results --out "$exp/results.md" --plot "$exp/results.png" "${rows[@]}"
log "done in $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s; table in $exp/results.md, plot $exp/results.png"

if [ "$check" = 1 ]; then
    python - "$exp" <<'EOF'
import sys
from pathlib import Path
exp = Path(sys.argv[1])
bleu = {n: float((exp / "gen" / n / "bleu.txt").read_text()) for n in ("fp32", "int8-w8", "int8-w4")}
limits = {"int8-w8": 0.3, "int8-w4": 1.0}
bad = [f"{n} loses {bleu['fp32'] - bleu[n]:.2f} BLEU (limit {lim})" for n, lim in limits.items()
       if bleu["fp32"] - bleu[n] > lim]
if bad:
    sys.exit("demo check failed: " + "; ".join(bad))
print(f"demo check passed: fp32 {bleu['fp32']:.2f}, 8-bit {bleu['int8-w8']:.2f}, 4-bit {bleu['int8-w4']:.2f}")
EOF
fi
