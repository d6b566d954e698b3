#!/usr/bin/env bash
# Real-data comparison of the BCQ and k-means methods on the demo's fp32 model: each row is a short
# quantization-aware fine-tuning from exp/demo/fp32/checkpoint_best.pt (run scripts/demo.sh first),
# then beam-5 translation of the test set, sacrebleu, and one table with the demo's rows.
#
#   bash scripts/methods.sh             # all rows (about an hour on 2 CPU cores at 150 updates)
#   bash scripts/methods.sh bcq-w3 km-w4  # some rows
#
# Rows: bcq-w3 (uniform 3-bit BCQ, pNR), bcq-paper (the paper's mixed configuration, pNR),
# bcq-mix (2.79 average bits, mixed by word frequency and layer: bcq_mix in scripts/demo_model.sh;
# pNR), bcq-w3-ste / bcq-paper-ste / bcq-mix-ste (bcq-w3, bcq-paper and bcq-mix without pNR:
# straight-through fake quantization at every step, 2 alternating rounds; bcq-w4-ste: the same at
# 4 bits), bcq-w2-alt / bcq-w2-greedy (2-bit BCQ, alternating vs greedy),
# km-w4 / km-w4-row (4-bit k-means, one codebook per tensor / per output row; km-w4-recluster: per
# tensor, re-clustered every 50 updates), bsflex-selfattn (1-bit BS-Flex on self-attention only,
# two centroids per tensor; bsflex-selfattn-row: per output row), prune50 (magnitude pruning
# 30% -> 50%, each tensor by its own magnitudes; prune50-layers: the same on the encoder and decoder
# layers only, embeddings dense; prune50-global: one magnitude threshold over all weights;
# prune50-global-gradual: the same, 10% more every tenth of the run up to 50% at 40%),
# and the controls fp32-ft100 / fp32-ft<N>: the fp32 model fine-tuned with the same schedule and no
# quantization. The demo's fp32 model is small and not converged, so fine-tuning alone changes its
# BLEU; the cost of a method is its BLEU against the control of the same length.
# Steps already done are skipped. DEMO_DIR as for demo.sh; METHODS_UPDATES (default 150) sets the
# fine-tuning length of every row (and names the control fp32-ft<N>), PNR_PERIOD (default 25) the
# pNR sync period of the BCQ rows, FP32_CKPT (default DEMO_DIR/fp32/checkpoint_best.pt) the start,
# METHODS_LR and METHODS_WARMUP the peak learning rate and warmup updates (default: the demo's
# qat_schedule in scripts/demo_model.sh), METHODS_SCHEDULE (default inverse_sqrt, the demo's) the lr
# schedule: `cosine` anneals it to 0 at the last update, so the final pNR sync and the control both
# end where the learning rate is ~0. METHODS_FLAGS: fairseq-train flags added to every row, the
# control included (e.g. METHODS_FLAGS='--dropout 0.0'; give it its own DEMO_DIR: the row names do
# not change).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/${QPLUGIN_VENV:-.venv}/bin:$PATH"
exp=${DEMO_DIR:-exp/demo}
log() { echo "$(date '+%F %T') | methods | $*" >&2; }
source scripts/demo_model.sh
fp32=${FP32_CKPT:-$exp/fp32/checkpoint_best.pt}
n=${METHODS_UPDATES:-150}
schedule=()  # overrides of the demo's qat_schedule
[ -z "${METHODS_LR:-}" ] || schedule+=(--lr "$METHODS_LR")
[ -z "${METHODS_WARMUP:-}" ] || schedule+=(--warmup "$METHODS_WARMUP")
case ${METHODS_SCHEDULE:-inverse_sqrt} in
    inverse_sqrt) sched_flags=() ;;
    cosine) sched_flags=(--lr-scheduler cosine) ;;
    *) echo "methods.sh: METHODS_SCHEDULE must be inverse_sqrt or cosine, got '$METHODS_SCHEDULE'" >&2; exit 2 ;;
esac
[ -f "$fp32" ] || { echo "methods.sh: $fp32 not found: run scripts/demo.sh first" >&2; exit 1; }

# name | arch | max updates | flags after the model flags
pnr="--optimizer pnr_adam --pnr-period ${PNR_PERIOD:-25}"
mix="${bcq_mix[*]}"  # 2.79 average bits (scripts/demo_model.sh)
prune="--quant-method none --prune-schedule 0:0.3,$((n * 2 / 5)):0.5"
gradual="0:0.1,$((n / 10)):0.2,$((n * 2 / 10)):0.3,$((n * 3 / 10)):0.4,$((n * 4 / 10)):0.5"  # +10% every n/10
declare -A rows=(
    [fp32-ft100]="transformer|100|"
    [fp32-ft$n]="transformer|$n|"
    [bcq-w3]="transformer_bcq|$n|--bcq-bits 3 $pnr"
    [bcq-paper]="transformer_bcq_paper|$n|$pnr"
    [bcq-w3-ste]="transformer_bcq|$n|--bcq-bits 3 --bcq-rounds 2"
    [bcq-w4-ste]="transformer_bcq|$n|--bcq-bits 4 --bcq-rounds 2"
    [bcq-paper-ste]="transformer_bcq_paper|$n|--bcq-rounds 2"
    [bcq-mix]="transformer_bcq|$n|$mix $pnr"
    [bcq-mix-ste]="transformer_bcq|$n|$mix --bcq-rounds 2"
    [bcq-w2-alt]="transformer_bcq|$n|--bcq-bits 2 $pnr"
    [bcq-w2-greedy]="transformer_bcq|$n|--bcq-bits 2 --bcq-search greedy $pnr"
    [km-w4]="transformer_kmeans|$n|--quant-method kmeans --quant-bits 4"
    [km-w4-row]="transformer_kmeans|$n|--quant-method kmeans --quant-bits 4 --quant-granularity channel"
    [km-w4-recluster]="transformer_kmeans|$n|--quant-method kmeans --quant-bits 4 --kmeans-recluster-interval 50"
    [bsflex-selfattn]="transformer_kmeans|$n|--quant-method bsflex --quant-include self_attn"
    [bsflex-selfattn-row]="transformer_kmeans|$n|--quant-method bsflex --quant-include self_attn --quant-granularity channel"
    [prune50]="transformer_kmeans|$n|$prune"
    [prune50-layers]="transformer_kmeans|$n|$prune --quant-include encoder,decoder --quant-exclude embeddings,output_projection"
    [prune50-global]="transformer_kmeans|$n|$prune --prune-ranking global"
    [prune50-global-gradual]="transformer_kmeans|$n|--quant-method none --prune-ranking global --prune-schedule $gradual"
)
order=(fp32-ft100 "fp32-ft$n" bcq-w3 bcq-paper bcq-mix bcq-w3-ste bcq-w4-ste bcq-paper-ste bcq-mix-ste bcq-w2-alt bcq-w2-greedy
       km-w4 km-w4-row km-w4-recluster bsflex-selfattn bsflex-selfattn-row prune50 prune50-layers prune50-global
       prune50-global-gradual)
selected=("$@")
[ ${#selected[@]} -gt 0 ] || selected=("${order[@]}")
for name in "${selected[@]}"; do
    [ -n "${rows[$name]:-}" ] || { echo "methods.sh: unknown row '$name' (rows: ${order[*]})" >&2; exit 2; }
done

recipes/generate.sh --data "$exp/data/bin" --checkpoint "$fp32" --raw-ref "$exp/data/raw/test.de" \
    --out "$exp/gen/fp32" --beam 5
table=("fp32=$fp32:$exp/gen/fp32")
for name in "${selected[@]}"; do
    IFS='|' read -r arch updates flags <<< "${rows[$name]}"
    log "$name: $arch $flags"
    # shellcheck disable=SC2086  # flags are words
    recipes/train.sh --data "$exp/data/bin" --save-dir "$exp/$name" --arch "$arch" --finetune-from "$fp32" \
        "${qat_schedule[@]}" ${schedule[@]+"${schedule[@]}"} --max-update "$updates" -- "${model[@]}" \
        ${sched_flags[@]+"${sched_flags[@]}"} $flags ${METHODS_FLAGS:-}
    recipes/generate.sh --data "$exp/data/bin" --checkpoint "$exp/$name/checkpoint_best.pt" \
        --raw-ref "$exp/data/raw/test.de" --out "$exp/gen/$name" --beam 5
    table+=("$name=$exp/$name/checkpoint_best.pt:$exp/gen/$name")
done
control=()
[[ " ${selected[*]} " != *" fp32-ft$n "* ]] || control=(--control "fp32-ft$n")
python -m fairseq_qplugin.results --out "$exp/methods.md" --plot "$exp/methods.png" ${control[@]+"${control[@]}"} "${table[@]}"
