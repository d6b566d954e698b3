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
# Another start: FP32_CKPT with its data in DEMO_DIR/data/bin and the raw test reference in
# DEMO_DIR/data/raw/test.de, and METHODS_MODEL_FLAGS its architecture flags (default: the demo's
# pre-norm model of scripts/demo_model.sh). METHODS_NO_SETUP=1 uses the environment as it is instead
# of running scripts/setup_env.sh.
# More rows: int4 / int2 (4-bit / 2-bit int weights, transformer_int8), int4-asym (int4 on each row's
# [min, max] range, all 16 levels: --quant-scheme asym), bin1 (1-bit weights: sign
# times the mean magnitude per row, transformer_int8 --quant-bits 1), bcq-w2-ste (2-bit BCQ straight-through),
# bcq-alloc-ste (the BCQ mix of a `fairseq-qallocate --output` JSON file given as METHODS_ALLOC,
# straight-through), bcq-hand25-ste (a hand mix of 2.5 average bits or less: embedding 4/3/2/1 bits
# by word frequency, encoder 3, decoder 2; straight-through), and with learned quantization
# parameters (docs/methods.md): bcq-w3-ls (bcq-w3-ste with --bcq-learn-scales), bcq-alloc-ls
# (bcq-alloc-ste with --bcq-learn-scales), int4-ls (int4 with --quant-learn-scale). Any row name
# with `-kd` appended trains that row with distillation from the start (docs/distill.md): --criterion
# label_smoothed_cross_entropy_distill with DISTILL_ALPHA (default 0.5) and DISTILL_TEMPERATURE
# (default 1.0); DISTILL_TEACHER sets another teacher.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${METHODS_NO_SETUP:-}" ] || bash scripts/setup_env.sh
export PATH="$PWD/${QPLUGIN_VENV:-.venv}/bin:$PATH"
exp=${DEMO_DIR:-exp/demo}
log() { echo "$(date '+%F %T') | methods | $*" >&2; }
source scripts/demo_model.sh
[ -z "${METHODS_MODEL_FLAGS:-}" ] || read -r -a model <<< "$METHODS_MODEL_FLAGS"
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
    [bcq-w2-ste]="transformer_bcq|$n|--bcq-bits 2 --bcq-rounds 2"
    [bcq-hand25-ste]="transformer_bcq|$n|--bcq-embed-bits 4 --bcq-embed-freq-ratio 1 --bcq-bits 3 --bcq-layer-bits decoder_self_attn:2,decoder_cross_attn:2,decoder_ffn:2 --bcq-rounds 2"
    [int4]="transformer_int8|$n|--quant-bits 4"
    [int4-asym]="transformer_int8|$n|--quant-bits 4 --quant-scheme asym"
    [int2]="transformer_int8|$n|--quant-bits 2"
    [bin1]="transformer_int8|$n|--quant-bits 1"
    [int4-ls]="transformer_int8|$n|--quant-bits 4 --quant-learn-scale"
    [bcq-w3-ls]="transformer_bcq|$n|--bcq-bits 3 --bcq-rounds 2 --bcq-learn-scales"
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
if [ -n "${METHODS_ALLOC:-}" ]; then
    alloc=$(python -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))["flags"]))' "$METHODS_ALLOC")
    rows[bcq-alloc-ste]="transformer_bcq|$n|$alloc --bcq-rounds 2"
    rows[bcq-alloc-ls]="transformer_bcq|$n|$alloc --bcq-rounds 2 --bcq-learn-scales"
fi
kd="--criterion label_smoothed_cross_entropy_distill --distill-alpha ${DISTILL_ALPHA:-0.5}"
kd+=" --distill-temperature ${DISTILL_TEMPERATURE:-1.0}${DISTILL_TEACHER:+ --distill-teacher $DISTILL_TEACHER}"
for name in "${!rows[@]}"; do
    [[ $name == fp32-* ]] || rows[$name-kd]="${rows[$name]} $kd"
done
order=(fp32-ft100 "fp32-ft$n" bcq-w3 bcq-paper bcq-mix bcq-w3-ste bcq-w4-ste bcq-paper-ste bcq-mix-ste bcq-w2-ste
       bcq-hand25-ste int4 int4-asym int2 bin1 bcq-w3-ls int4-ls bcq-w2-alt bcq-w2-greedy km-w4 km-w4-row km-w4-recluster bsflex-selfattn bsflex-selfattn-row
       prune50 prune50-layers prune50-global prune50-global-gradual)
selected=("$@")
[ ${#selected[@]} -gt 0 ] || selected=("${order[@]}")
for name in "${selected[@]}"; do
    [ -n "${rows[$name]:-}" ] || { echo "methods.sh: unknown row '$name' (rows: ${order[*]}, each but the controls also with -kd)" >&2; exit 2; }
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
python -m fairseq_qplugin.results --data "$exp/data/bin" --out "$exp/methods.md" --plot "$exp/methods.png" ${control[@]+"${control[@]}"} "${table[@]}"
