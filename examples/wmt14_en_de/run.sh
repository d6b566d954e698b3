#!/usr/bin/env bash
# Usage: examples/wmt14_en_de/run.sh [options]
#
# WMT14 English-German end to end, in the papers' setting: prepare the data (recipes/prepare_wmt14.sh),
# train an fp32 transformer_wmt_en_de (or take yours), quantize it with each method at the papers'
# configurations (quantization-aware fine-tuning from the fp32 model), translate newstest2014 with
# beam 4 and length penalty 0.6, score (sacrebleu on detokenized text, and tokenized BLEU with
# compound splitting), and write EXP/results.md and EXP/results.png.
#
# Options:
#   --exp DIR             where everything goes (default: exp/wmt14_en_de)
#   --local-dir DIR       the WMT archives, already downloaded (else they are downloaded)
#   --subword bpe|spm     joint BPE on Moses tokens (default) or sentencepiece (see prepare_wmt14.sh)
#   --bpe-merges N        (default: 32000)   --vocab-size N  sentencepiece vocabulary (default: 32000)
#   --from-checkpoint CKPT  skip fp32 training: fine-tune from CKPT, a transformer_wmt_en_de trained
#                         with --share-all-embeddings on the dictionary of EXP/wmt14/data/bin
#   --methods LIST        comma list of the rows to run (default: all), of
#                         int8-w8, int8-w4     range-based linear weights, 8 and 4 bits (Fan)
#                         int8-w1              binary weights only, attention temperature 200 (Fan)
#                         km-w4                4-bit k-means weight sharing (poster)
#                         bsflex-selfattn      1-bit BS-Flex on the self-attention only (poster)
#                         bcq-paper            BCQ, embedding 2.5 / decoder 1.8 / encoder 3.7 bits,
#                                              pNR, staged embedding -> decoder -> encoder
#                                              (recipes/bcq_staged.sh; Chung & Kim et al. 2020)
#   --fp32-updates N      fp32 training updates (default: 100000)
#   --qat-updates N       fine-tuning updates of each method (default: 20000)
#   --stage-updates N     updates of each of the three BCQ stages (default: 10000)
#   --gpus N              train each model on N GPUs of this machine (default: 1; fairseq's data-parallel
#                         training, NCCL); without CUDA, N CPU processes (recipes/train.sh --procs;
#                         not for bcq-paper, whose stages fairseq starts itself: on GPUs only)
#   --max-tokens N        tokens per batch and GPU (default: 4096); --update-freq N (default: 8 / N,
#                         so one update sees about 32k tokens, as 8 GPUs x 4096)
#   --tiny                a 1-layer d=32 model, a few updates, short outputs: checks the whole pipeline
#                         in minutes on a CPU (the BLEU means nothing)
#   -h, --help            show this help
#
# Every step is a recipe with a stamp: running the script again skips what is done and resumes what
# was interrupted. The published numbers (examples/wmt14_en_de/published.md) are appended to
# results.md under their own heading: they are the papers', not measured here.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
RECIPE_SCRIPT=${BASH_SOURCE[0]}
source "$ROOT/recipes/lib.sh"
RECIPES=$ROOT/recipes
ALL_METHODS=(int8-w8 int8-w4 int8-w1 km-w4 bsflex-selfattn bcq-paper)

EXP=exp/wmt14_en_de LOCAL_DIR="" SUBWORD=bpe BPE_MERGES=32000 VOCAB_SIZE=32000 FROM_CKPT="" METHODS=""
FP32_UPDATES=100000 QAT_UPDATES=20000 STAGE_UPDATES=10000 MAX_TOKENS=4096 UPDATE_FREQ="" TINY=0 GPUS=1
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --exp) need_value "$1" $#; EXP=$2; shift 2 ;;
        --local-dir) need_value "$1" $#; LOCAL_DIR=$2; shift 2 ;;
        --subword) need_value "$1" $#; SUBWORD=$2; shift 2 ;;
        --bpe-merges) need_value "$1" $#; BPE_MERGES=$2; shift 2 ;;
        --vocab-size) need_value "$1" $#; VOCAB_SIZE=$2; shift 2 ;;
        --from-checkpoint) need_value "$1" $#; FROM_CKPT=$2; shift 2 ;;
        --methods) need_value "$1" $#; METHODS=$2; shift 2 ;;
        --fp32-updates) need_value "$1" $#; FP32_UPDATES=$2; shift 2 ;;
        --qat-updates) need_value "$1" $#; QAT_UPDATES=$2; shift 2 ;;
        --stage-updates) need_value "$1" $#; STAGE_UPDATES=$2; shift 2 ;;
        --max-tokens) need_value "$1" $#; MAX_TOKENS=$2; shift 2 ;;
        --update-freq) need_value "$1" $#; UPDATE_FREQ=$2; shift 2 ;;
        --gpus) need_value "$1" $#; GPUS=$2; shift 2 ;;
        --tiny) TINY=1; shift ;;
        *) arg_error "unknown argument '$1'" ;;
    esac
done
check_int --gpus "$GPUS" 1
UPDATE_FREQ=${UPDATE_FREQ:-$(((8 + GPUS - 1) / GPUS))}
for n in FP32_UPDATES QAT_UPDATES STAGE_UPDATES MAX_TOKENS UPDATE_FREQ; do
    flag="--$(echo "$n" | tr 'A-Z_' 'a-z-')"
    check_int "$flag" "${!n}" 1
done
IFS=',' read -r -a SELECTED <<<"${METHODS:-$(IFS=,; echo "${ALL_METHODS[*]}")}"
for m in "${SELECTED[@]}"; do
    [[ " ${ALL_METHODS[*]} " == *" $m "* ]] || arg_error "--methods: unknown row '$m' (rows: ${ALL_METHODS[*]})"
done
if [[ -n $FROM_CKPT ]]; then
    FROM_CKPT=$(abspath "$FROM_CKPT")
    require_file "$FROM_CKPT" "--from-checkpoint"
fi
EXP=$(abspath "$EXP")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # python -m fairseq_qplugin.results of this tree

# The papers' model: transformer base (fairseq transformer_wmt_en_de), shared embeddings, dropout 0.1.
SIZE=wmt_en_de
MODEL=(--dropout 0.1)
FP32_SCHEDULE=(--max-update "$FP32_UPDATES" --lr 0.0007 --warmup 4000 --max-tokens "$MAX_TOKENS")
QAT_LR=0.0001 QAT_WARMUP=500 PNR_PERIOD=1000
COMMON=(--update-freq "$UPDATE_FREQ")
GEN_EXTRA=(--max-tokens 8000)
if [[ $TINY == 1 ]]; then
    SIZE=""
    MODEL=(--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 --decoder-embed-dim 32
        --encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 2
        --decoder-attention-heads 2)
    FP32_SCHEDULE=(--max-update 20 --lr 0.003 --warmup 10 --max-tokens 2000 --save-interval 0)
    QAT_UPDATES=3 QAT_LR=0.001 QAT_WARMUP=2 MAX_TOKENS=2000 STAGE_UPDATES=2 PNR_PERIOD=1
    COMMON=()
    GEN_EXTRA=(--max-len-b 20)
fi
QAT_SCHEDULE=(--max-update "$QAT_UPDATES" --lr "$QAT_LR" --warmup "$QAT_WARMUP" --max-tokens "$MAX_TOKENS")
FP32_SCHEDULE+=(--procs "$GPUS")
QAT_SCHEDULE+=(--procs "$GPUS")
arch() { echo "$1${SIZE:+_$SIZE}"; }  # transformer_int8 -> transformer_int8_wmt_en_de

log "1. data: WMT14 $SUBWORD"
PREP=(--out "$EXP/wmt14" --subword "$SUBWORD")
[[ -z $LOCAL_DIR ]] || PREP+=(--local-dir "$LOCAL_DIR")
if [[ $SUBWORD == bpe ]]; then PREP+=(--bpe-merges "$BPE_MERGES"); else PREP+=(--vocab-size "$VOCAB_SIZE"); fi
"$RECIPES/prepare_wmt14.sh" "${PREP[@]}"
DATA=$EXP/wmt14/data/bin
REF=$EXP/wmt14/data/raw/test.de

log "2. fp32 model"
if [[ -n $FROM_CKPT ]]; then
    FP32=$FROM_CKPT
    log "using --from-checkpoint $FP32"
else
    "$RECIPES/train.sh" --data "$DATA" --save-dir "$EXP/fp32" --arch "$(arch transformer)" "${FP32_SCHEDULE[@]}" \
        -- "${MODEL[@]}" "${COMMON[@]+"${COMMON[@]}"}"
    FP32=$EXP/fp32/checkpoint_best.pt
fi

log "3. quantization-aware fine-tuning: ${SELECTED[*]}"
declare -A ROWS=(
    [int8-w8]="transformer_int8|--quant-bits 8"
    [int8-w4]="transformer_int8|--quant-bits 4"
    [int8-w1]="transformer_int8|--quant-bits 1 --attn-temperature 200"
    [km-w4]="transformer_kmeans|--quant-method kmeans --quant-bits 4"
    [bsflex-selfattn]="transformer_kmeans|--quant-method bsflex --quant-include self_attn"
)
declare -A CKPT=([fp32]=$FP32)
for m in "${SELECTED[@]}"; do
    if [[ $m == bcq-paper ]]; then
        # The paper's mixed precision (transformer_bcq_paper has the transformer base sizes), pNR,
        # three stages; EXP/bcq-paper carries a stamp like every recipe's output directory.
        STEP_CONFIG=""
        config_add recipe bcq_staged
        config_add init "$FP32"
        config_add stage_updates "$STAGE_UPDATES"
        config_add pnr_period "$PNR_PERIOD"
        config_add lr "$QAT_LR"
        BCQ_ARGS=(--arch transformer_bcq_paper "${MODEL[@]}" --share-all-embeddings --max-tokens "$MAX_TOKENS"
            --lr-scheduler inverse_sqrt --warmup-updates "$QAT_WARMUP" --warmup-init-lr 1e-07
            --no-epoch-checkpoints --log-format simple --log-interval 50 "${COMMON[@]+"${COMMON[@]}"}")
        # recipes/bcq_staged.sh runs fairseq-train itself: fairseq starts the GPU processes
        ((GPUS == 1)) || BCQ_ARGS+=(--distributed-world-size "$GPUS")
        config_add args "$(quote_args "${BCQ_ARGS[@]}")"
        if stamp_check "$EXP/bcq-paper" "--exp"; then
            log "bcq-paper: already trained with this configuration: skipping (delete $EXP/bcq-paper/.done to redo)"
        else
            STAGE_UPDATES=$STAGE_UPDATES PNR_PERIOD=$PNR_PERIOD LR=$QAT_LR \
                "$RECIPES/bcq_staged.sh" "$DATA" "$FP32" "$EXP/bcq-paper" "${BCQ_ARGS[@]}" \
                >>"$EXP/bcq-paper/train.log" 2>&1 || die "recipes/bcq_staged.sh failed (log: $EXP/bcq-paper/train.log)"
            stamp_done "$EXP/bcq-paper"
        fi
        CKPT[$m]=$EXP/bcq-paper/3-encoder/checkpoint_best.pt
        continue
    fi
    IFS='|' read -r model flags <<<"${ROWS[$m]}"
    # shellcheck disable=SC2086  # flags are words
    "$RECIPES/train.sh" --data "$DATA" --save-dir "$EXP/$m" --arch "$(arch "$model")" --finetune-from "$FP32" \
        "${QAT_SCHEDULE[@]}" -- "${MODEL[@]}" "${COMMON[@]+"${COMMON[@]}"}" $flags
    CKPT[$m]=$EXP/$m/checkpoint_best.pt
done

log "4. translate newstest2014 (beam 4, lenpen 0.6) and score"
for m in fp32 "${SELECTED[@]}"; do
    "$RECIPES/generate.sh" --data "$DATA" --checkpoint "${CKPT[$m]}" --raw-ref "$REF" --out "$EXP/gen/$m" \
        --beam 4 --lenpen 0.6 --batch-size 128 -- "${GEN_EXTRA[@]}"
done

log "5. results"
python -m fairseq_qplugin.results --exp-dir "$EXP" --baseline fp32 --title "WMT14 en-de newstest2014 ($SUBWORD)" >/dev/null
{
    printf '\nMeasured here: BLEU is sacrebleu (13a, mixed case) on detokenized newstest2014; tok. BLEU is\n'
    printf 'Moses-tokenized with compound splitting, multi-bleu style (the number the papers report).\n\n'
    cat "$HERE/published.md"
} >>"$EXP/results.md"
log "done: $EXP/results.md, $EXP/results.png"
