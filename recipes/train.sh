#!/usr/bin/env bash
# Usage: recipes/train.sh --data BIN --save-dir DIR --arch ARCH [options] [-- EXTRA_FAIRSEQ_TRAIN_ARGS...]
#
# Train (or fine-tune) a translation model with fairseq-train and the fairseq_qplugin plugin
# (--user-dir, so the plugin's architectures and quantization flags are available).
#
# Required:
#   --data BIN             fairseq binary data with a joined dictionary (prepare_corpus.sh OUT/bin)
#   --save-dir DIR         where checkpoints go (created)
#   --arch ARCH            fairseq architecture, e.g. transformer or one of the plugin's
# Options:
#   --max-update N         number of updates (default: 500)
#   --lr LR                peak learning rate (default: 0.002)
#   --warmup N             linear warmup updates of the inverse_sqrt schedule (default: 150)
#   --max-tokens N         tokens per batch (default: 4096)
#   --seed N               random seed (default: 1)
#   --save-interval N      also save checkpoint_last.pt (and validate) every N updates, so an
#                          interrupted run resumes from there (default: 500; 0 = only at epoch ends)
#   --finetune-from CKPT   start from the weights of CKPT (fairseq --finetune-from-model: the
#                          optimizer, lr scheduler, meters and data loader start afresh)
#   --procs N              data-parallel training on N processes (default: 1). With CUDA: N GPUs of
#                          this machine (fairseq starts them: --distributed-world-size N, NCCL).
#                          Without (or with --cpu after --): N CPU processes of one gloo job on
#                          127.0.0.1 (rank 0 logs to train.log, rank R to train.rankR.log). Each
#                          process takes --max-tokens per batch: an update sees N times as many
#                          tokens (divide --update-freq by N to keep the same batch)
#   -h, --help             show this help
#   -- ARGS...             everything after -- goes unchanged to fairseq-train, after the
#                          defaults below, so it can override them (e.g. -- --dropout 0.3, or the
#                          plugin's quantization flags)
#
# The defaults suit a small model on a 2-core CPU: 500 updates of 4096 tokens train a 3+3-layer
# d=256 pre-norm transformer in about 10 minutes (pass --encoder-normalize-before
# --decoder-normalize-before after --: pre-norm learns much faster than fairseq's post-norm default
# in such short runs).
#
# Always passed to fairseq-train:
#   --task translation --share-all-embeddings --optimizer adam --adam-betas '(0.9,0.98)'
#   --lr-scheduler inverse_sqrt --warmup-init-lr 1e-07 --criterion label_smoothed_cross_entropy
#   --label-smoothing 0.1 --no-epoch-checkpoints --keep-interval-updates 1
#   --log-format simple --log-interval 50
#
# Output: DIR/checkpoint_best.pt (lowest validation loss), DIR/checkpoint_last.pt, DIR/train.log,
# and the stamp DIR/.done. Re-running with the same configuration skips at once; a DIR made with
# another configuration is an error; an interrupted run resumes from DIR/checkpoint_last.pt (or, if a
# kill left that file empty or cut, from the newest intact checkpoint in DIR).
# The plugin directory is ../fairseq_qplugin next to this script (override with QPLUGIN_USER_DIR).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DATA="" SAVE_DIR="" ARCH="" MAX_UPDATE=500 LR=0.002 WARMUP=150 MAX_TOKENS=4096 SEED=1
SAVE_INTERVAL=500 FINETUNE_FROM="" PROCS=1
EXTRA=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --data) need_value "$1" $#; DATA=$2; shift 2 ;;
        --save-dir) need_value "$1" $#; SAVE_DIR=$2; shift 2 ;;
        --arch) need_value "$1" $#; ARCH=$2; shift 2 ;;
        --max-update) need_value "$1" $#; MAX_UPDATE=$2; shift 2 ;;
        --lr) need_value "$1" $#; LR=$2; shift 2 ;;
        --warmup) need_value "$1" $#; WARMUP=$2; shift 2 ;;
        --max-tokens) need_value "$1" $#; MAX_TOKENS=$2; shift 2 ;;
        --seed) need_value "$1" $#; SEED=$2; shift 2 ;;
        --save-interval) need_value "$1" $#; SAVE_INTERVAL=$2; shift 2 ;;
        --finetune-from) need_value "$1" $#; FINETUNE_FROM=$2; shift 2 ;;
        --procs) need_value "$1" $#; PROCS=$2; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) arg_error "unknown argument '$1' (fairseq-train arguments go after --)" ;;
    esac
done

[[ -n $DATA ]] || arg_error "--data is required"
[[ -n $SAVE_DIR ]] || arg_error "--save-dir is required"
[[ -n $ARCH ]] || arg_error "--arch is required"
check_int --max-update "$MAX_UPDATE" 1
check_number --lr "$LR"
check_int --warmup "$WARMUP" 1
check_int --max-tokens "$MAX_TOKENS" 1
check_int --seed "$SEED"
check_int --save-interval "$SAVE_INTERVAL"
check_int --procs "$PROCS" 1
require_cmd fairseq-train python
require_plugin

DATA=$(abspath "$DATA")
SAVE_DIR=$(abspath "$SAVE_DIR")
[[ -d $DATA ]] || die "--data $DATA is not a directory (give prepare_corpus.sh's OUT/bin)"
compgen -G "$DATA/train.*.idx" >/dev/null || die "no train.*.idx in $DATA: not a fairseq binary data set"
compgen -G "$DATA/valid.*.idx" >/dev/null || die "no valid.*.idx in $DATA: fairseq-train needs a valid split"
DICTS=("$DATA"/dict.*.txt)
[[ ${#DICTS[@]} -eq 2 && -f ${DICTS[0]} ]] || die "expected two dict.*.txt in $DATA (found ${#DICTS[@]})"
cmp -s "${DICTS[0]}" "${DICTS[1]}" ||
    die "${DICTS[0]##*/} and ${DICTS[1]##*/} differ: --share-all-embeddings needs a joined dictionary (fairseq-preprocess --joined-dictionary)"
if [[ -n $FINETUNE_FROM ]]; then
    FINETUNE_FROM=$(abspath "$FINETUNE_FROM")
    require_file "$FINETUNE_FROM" "--finetune-from checkpoint"
    [[ $(dirname "$FINETUNE_FROM") != "$SAVE_DIR" ]] ||
        die "--finetune-from $FINETUNE_FROM is inside --save-dir $SAVE_DIR; fine-tune into another directory"
fi

config_add recipe train
config_add data "$DATA"
config_add arch "$ARCH"
config_add max_update "$MAX_UPDATE"
config_add lr "$LR"
config_add warmup "$WARMUP"
config_add max_tokens "$MAX_TOKENS"
config_add seed "$SEED"
config_add save_interval "$SAVE_INTERVAL"
config_add finetune_from "${FINETUNE_FROM:-none}"
config_add_nondefault procs "$PROCS" 1
[[ -z $FINETUNE_FROM ]] || config_add finetune_from_sha256 "$(file_sha "$FINETUNE_FROM")"
config_add extra_args "$(quote_args "${EXTRA[@]+"${EXTRA[@]}"}")"
if stamp_check "$SAVE_DIR" --save-dir; then
    log "$SAVE_DIR is already trained with this configuration: skipping (delete $SAVE_DIR/.done to redo)"
    exit 0
fi

ARGS=("$DATA" --user-dir "$QPLUGIN_USER_DIR" --task translation --arch "$ARCH"
    --share-all-embeddings
    --optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0
    --lr "$LR" --lr-scheduler inverse_sqrt --warmup-updates "$WARMUP" --warmup-init-lr 1e-07
    --criterion label_smoothed_cross_entropy --label-smoothing 0.1
    --max-tokens "$MAX_TOKENS" --max-update "$MAX_UPDATE" --seed "$SEED"
    --save-dir "$SAVE_DIR" --no-epoch-checkpoints
    --save-interval-updates "$SAVE_INTERVAL" --keep-interval-updates 1
    --log-format simple --log-interval 50)
[[ -z $FINETUNE_FROM ]] || ARGS+=(--finetune-from-model "$FINETUNE_FROM")
ARGS+=("${EXTRA[@]+"${EXTRA[@]}"}")

# fairseq writes checkpoint_last.pt by a copy that is not atomic: a kill right after it reports a
# save can leave the file empty or cut. Resume then from the newest intact checkpoint instead.
LAST=$SAVE_DIR/checkpoint_last.pt
intact() { python -c 'import sys, zipfile; sys.exit(zipfile.ZipFile(sys.argv[1]).testzip() is not None)' "$1" 2>/dev/null; }
if [[ -f $LAST ]] && ! intact "$LAST"; then
    GOOD=""
    for f in "$SAVE_DIR"/checkpoint*.pt; do
        if [[ $f != "$LAST" ]] && intact "$f" && [[ -z $GOOD || $f -nt $GOOD ]]; then GOOD=$f; fi
    done
    [[ -n $GOOD ]] ||
        die "$LAST is empty or damaged and $SAVE_DIR holds no other intact checkpoint: delete $SAVE_DIR to train from scratch"
    mv -f -- "$LAST" "$LAST.damaged"
    cp -- "$GOOD" "$LAST.tmp" && mv -f -- "$LAST.tmp" "$LAST"
    warn "$LAST was empty or damaged (kept as $LAST.damaged): resuming from the newest intact checkpoint, ${GOOD##*/}"
fi
if [[ -f $LAST ]]; then
    log "resuming from $LAST"
fi
# fairseq-train ARGS... on $PROCS processes (see --procs); rank 0's output goes to train.log.
train_procs() {
    local py port r pids=() rc=0
    py=$(dirname "$(command -v fairseq-train)")/python
    [[ -x $py ]] || py=python
    if ((PROCS == 1)); then
        fairseq-train "$@" 2>&1 | tee -a "$SAVE_DIR/train.log"
    elif [[ " $* " != *" --cpu "* ]] && "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        fairseq-train "$@" --distributed-world-size "$PROCS" 2>&1 | tee -a "$SAVE_DIR/train.log"
    else
        # fairseq cannot start CPU processes itself (its spawn counts GPUs), and its default
        # --ddp-backend pytorch_ddp hands torch's DDP a GPU device id: legacy_ddp all-reduces instead.
        port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        for ((r = 0; r < PROCS; r++)); do
            local dist=(--cpu --distributed-init-method "tcp://127.0.0.1:$port" --distributed-world-size "$PROCS"
                --distributed-rank "$r" --distributed-no-spawn --distributed-backend gloo --ddp-backend legacy_ddp)
            if ((r == 0)); then
                fairseq-train "$@" "${dist[@]}" > >(tee -a "$SAVE_DIR/train.log") 2>&1 &
            else
                fairseq-train "$@" "${dist[@]}" >>"$SAVE_DIR/train.rank$r.log" 2>&1 &
            fi
            pids+=($!)
        done
        # a failed rank leaves the others waiting for it: stop them
        while ((${#pids[@]})); do
            for r in "${!pids[@]}"; do
                kill -0 "${pids[r]}" 2>/dev/null && continue
                wait "${pids[r]}" || { rc=$?; kill "${pids[@]}" 2>/dev/null || true; wait; return "$rc"; }
                unset "pids[r]"
            done
            sleep 1
        done
    fi
}
log "fairseq-train $(quote_args "${ARGS[@]}")$( ((PROCS == 1)) || echo " on $PROCS processes")"
START=$(now_s)
train_procs "${ARGS[@]}" || die "fairseq-train failed (log: $SAVE_DIR/train.log)"
ELAPSED=$(elapsed_since "$START")

for f in checkpoint_best.pt checkpoint_last.pt; do
    require_file "$SAVE_DIR/$f" "fairseq-train finished but $f"
done
# The mid-epoch checkpoint_E_U.pt files only serve resumption: drop them once training is done.
rm -f "$SAVE_DIR"/checkpoint_[0-9]*_[0-9]*.pt

stamp_done "$SAVE_DIR" "elapsed_s=$ELAPSED"
log "done in ${ELAPSED}s: $SAVE_DIR/checkpoint_best.pt"
