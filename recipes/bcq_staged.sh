#!/usr/bin/env bash
# Staged BCQ retraining (Chung & Kim et al. 2020, METHODS.md §3): quantize and retrain the embedding
# block (token embeddings and output projection), then the decoder as well, then the encoder as
# well; each stage starts from the previous stage's checkpoint and trains with pNR.
#
#   recipes/bcq_staged.sh DATA_BIN FP32_CHECKPOINT SAVE_ROOT [fairseq-train flags for every stage...]
#
#   recipes/bcq_staged.sh exp/data/bin exp/fp32/checkpoint_best.pt exp/bcq_paper \
#       --arch transformer_bcq_paper_iwslt_de_en --share-all-embeddings --max-tokens 4096
#
# The flags after SAVE_ROOT (architecture, bits, batch, ...) come after this script's defaults and
# so override them; do not pass --quant-include, which is the stage. Environment: STAGE_UPDATES
# (--max-update of each stage, default 4000), PNR_PERIOD (default 1000), LR (default 2e-4),
# FROM (the checkpoint each stage hands on, default checkpoint_best.pt). Stages go to
# SAVE_ROOT/1-embedding, 2-decoder, 3-encoder; re-running the script resumes an interrupted stage
# (fairseq resumes from a stage's checkpoint_last.pt when there is one).
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
if [ $# -lt 3 ]; then
    sed -n '2,16p' "$0" >&2
    exit 2
fi
data=$1 init=$2 root=$3
shift 3
plugin="$(cd "$(dirname "$0")/.." && pwd)/fairseq_qplugin"
log() { echo "$(date '+%F %T') | bcq_staged | $*" >&2; }

stages=(
    "1-embedding embeddings,output_projection"
    "2-decoder embeddings,output_projection,decoder_layers"
    "3-encoder all"
)
for stage in "${stages[@]}"; do
    read -r name parts <<< "$stage"
    log "stage $name: quantized parts $parts, starting from $init"
    fairseq-train "$data" --user-dir "$plugin" --arch transformer_bcq \
        --optimizer pnr_adam --adam-betas '(0.9, 0.98)' --pnr-period "${PNR_PERIOD:-1000}" \
        --lr "${LR:-2e-4}" --max-update "${STAGE_UPDATES:-4000}" \
        --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
        --save-dir "$root/$name" --finetune-from-model "$init" \
        "$@" --quant-include "$parts"
    init="$root/$name/${FROM:-checkpoint_best.pt}"
done
log "done: $init"
