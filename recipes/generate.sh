#!/usr/bin/env bash
# Usage: recipes/generate.sh --data BIN --checkpoint CKPT --raw-ref REF --out DIR [options] [-- EXTRA_FAIRSEQ_GENERATE_ARGS...]
#
# Translate a split of a fairseq binary data set with fairseq-generate (beam search, plugin loaded
# with --user-dir), undo the subwords (sentencepiece, or BPE and then the Moses tokenization, as
# BIN/preprocessing.txt of prepare_corpus.sh says; sentencepiece when it is absent), and score
# against the raw reference: sacrebleu, and the tokenized BLEU with compound splitting of the
# WMT14 en-de papers (fairseq_qplugin/scoring.py).
#
# Required:
#   --data BIN           fairseq binary data (prepare_corpus.sh OUT/bin)
#   --checkpoint CKPT    model checkpoint (train.sh DIR/checkpoint_best.pt)
#   --raw-ref REF        untokenized reference of the split, one sentence per line
#                        (prepare_corpus.sh OUT/raw/test.TGT)
#   --out DIR            output directory (created)
# Options:
#   --subset NAME        split to translate: test, valid or train (default: test)
#   --beam N             beam size (default: 5)
#   --lenpen X           length penalty (default: 1.0)
#   --batch-size N       sentences per batch (default: 64)
#   --lang LANG          target language for the Moses (de)tokenizer (default: tgt= of
#                        BIN/preprocessing.txt, else the suffix of --raw-ref, e.g. test.de -> de)
#   -h, --help           show this help
#   -- ARGS...           passed unchanged to fairseq-generate after the defaults (e.g. --max-tokens 4000)
#
# Output:
#   DIR/hyp.txt          detokenized hypotheses, in the order of the split (sentence id)
#   DIR/bleu.txt         corpus BLEU (sacrebleu defaults: 13a tokenization, mixed case), just the number
#   DIR/compound_bleu.txt  tokenized BLEU with compound splitting (Moses tokenizer, ##AT##-##AT##,
#                        multi-bleu), just the number
#   DIR/sacrebleu.json   sacrebleu's JSON for BLEU (score, signature, verbose_score) plus chrF2 and
#                        compound_split_bleu
#   DIR/speed.txt        generation speed in target tokens/s (fairseq-generate's "Translated" line)
#   DIR/speed.json       the same with sentences, tokens, generation seconds and the command's wall time
#   DIR/generate.out     fairseq-generate's full output
#   DIR/.done            stamp; same configuration (incl. the checkpoint's sha256) skips at once,
#                        another one in the same DIR is an error
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DATA="" CKPT="" REF="" OUT="" SUBSET=test BEAM=5 LENPEN=1.0 BATCH_SIZE=64 LANG_FLAG=""
EXTRA=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --data) need_value "$1" $#; DATA=$2; shift 2 ;;
        --checkpoint) need_value "$1" $#; CKPT=$2; shift 2 ;;
        --raw-ref) need_value "$1" $#; REF=$2; shift 2 ;;
        --out) need_value "$1" $#; OUT=$2; shift 2 ;;
        --subset) need_value "$1" $#; SUBSET=$2; shift 2 ;;
        --beam) need_value "$1" $#; BEAM=$2; shift 2 ;;
        --lenpen) need_value "$1" $#; LENPEN=$2; shift 2 ;;
        --batch-size) need_value "$1" $#; BATCH_SIZE=$2; shift 2 ;;
        --lang) need_value "$1" $#; LANG_FLAG=$2; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) arg_error "unknown argument '$1' (fairseq-generate arguments go after --)" ;;
    esac
done

[[ -n $DATA ]] || arg_error "--data is required"
[[ -n $CKPT ]] || arg_error "--checkpoint is required"
[[ -n $REF ]] || arg_error "--raw-ref is required"
[[ -n $OUT ]] || arg_error "--out is required"
[[ $SUBSET =~ ^[A-Za-z0-9_]+$ ]] || arg_error "--subset must be a split name like test, got '$SUBSET'"
check_int --beam "$BEAM" 1
check_number --lenpen "$LENPEN"
check_int --batch-size "$BATCH_SIZE" 1
require_cmd fairseq-generate python
require_plugin

DATA=$(abspath "$DATA")
CKPT=$(abspath "$CKPT")
REF=$(abspath "$REF")
OUT=$(abspath "$OUT")
[[ -d $DATA ]] || die "--data $DATA is not a directory (give prepare_corpus.sh's OUT/bin)"
compgen -G "$DATA/$SUBSET.*.idx" >/dev/null || die "no $SUBSET.*.idx in $DATA: split '$SUBSET' not binarized there"
require_file "$CKPT" "--checkpoint"
require_file "$REF" "--raw-ref reference"
[[ -s $REF ]] || die "--raw-ref $REF is empty"
python -c 'import sacrebleu, sacremoses' 2>/dev/null ||
    die "the sacrebleu and sacremoses Python modules are needed (pip install sacrebleu sacremoses)"
SCORING="$QPLUGIN_USER_DIR/scoring.py"  # the plugin whose model is scored

# How the data was prepared (prepare_corpus.sh writes BIN/preprocessing.txt; older data: sentencepiece).
SUBWORD=spm TOKENIZE=none DATA_TGT=""
if [[ -f $DATA/preprocessing.txt ]]; then
    SUBWORD=$(_stamp_get "$DATA/preprocessing.txt" subword)
    TOKENIZE=$(_stamp_get "$DATA/preprocessing.txt" tokenize)
    DATA_TGT=$(_stamp_get "$DATA/preprocessing.txt" tgt)
fi
case $SUBWORD in
    spm) POST_PROCESS=sentencepiece ;;
    bpe) POST_PROCESS=subword_nmt ;;  # = --remove-bpe
    *) die "$DATA/preprocessing.txt: unknown subword=$SUBWORD (expected spm or bpe)" ;;
esac
[[ $TOKENIZE == none || $TOKENIZE == moses ]] || die "$DATA/preprocessing.txt: unknown tokenize=$TOKENIZE"
TGT_LANG=${LANG_FLAG:-$DATA_TGT}
if [[ -z $TGT_LANG ]]; then
    TGT_LANG=${REF##*.}
    [[ $TGT_LANG =~ ^[a-z]{2,3}$ ]] || die "cannot tell the target language from --raw-ref $REF: give --lang (e.g. --lang de)"
fi

config_add recipe generate
config_add data "$DATA"
config_add subset "$SUBSET"
config_add checkpoint "$CKPT"
config_add checkpoint_sha256 "$(file_sha "$CKPT")"
config_add raw_ref "$REF"
config_add raw_ref_sha256 "$(file_sha "$REF")"
config_add beam "$BEAM"
config_add lenpen "$LENPEN"
config_add batch_size "$BATCH_SIZE"
config_add extra_args "$(quote_args "${EXTRA[@]+"${EXTRA[@]}"}")"
# (keys added after the first version only when not the old behaviour, so older DIRs still match)
config_add_nondefault subword "$SUBWORD" spm
config_add_nondefault tokenize "$TOKENIZE" none
config_add_nondefault lang "$LANG_FLAG" ""
if stamp_check "$OUT" --out; then
    log "$OUT already has this generation: skipping (BLEU $(cat "$OUT/bleu.txt"); delete $OUT/.done to redo)"
    exit 0
fi

# 1. translate.
if ! step_done "$OUT" generate; then
    ARGS=("$DATA" --user-dir "$QPLUGIN_USER_DIR" --task translation --path "$CKPT"
        --gen-subset "$SUBSET" --beam "$BEAM" --lenpen "$LENPEN" --batch-size "$BATCH_SIZE"
        --post-process "$POST_PROCESS" --required-batch-size-multiple 1)
    # (--required-batch-size-multiple 1: fairseq's batch_by_size drops the last sentences of a split
    # whose size is not a multiple of the default 8 when they all fit in one batch, e.g. 30 of 24)
    ARGS+=("${EXTRA[@]+"${EXTRA[@]}"}")
    log "fairseq-generate $(quote_args "${ARGS[@]}")"
    START=$(now_s)
    fairseq-generate "${ARGS[@]}" >"$OUT/generate.out" 2>&1 || {
        tail -n 20 "$OUT/generate.out" >&2
        die "fairseq-generate failed (full output: $OUT/generate.out)"
    }
    echo "$(elapsed_since "$START")" >"$OUT/.generate_wall_s"
    step_mark "$OUT" generate
fi
WALL=$(cat "$OUT/.generate_wall_s")

# 2. hypotheses in sentence order (Moses-detokenized for tokenized data); 3. BLEU and speed.
python "$SCORING" generate-out "$OUT" --ref "$REF" --lang "$TGT_LANG" --wall-s "$WALL" \
    --detok "$([[ $TOKENIZE == moses ]] && echo moses || echo none)" || die "scoring $OUT/generate.out failed"

stamp_done "$OUT" "bleu=$(cat "$OUT/bleu.txt")" "compound_split_bleu=$(cat "$OUT/compound_bleu.txt")" \
    "tokens_per_s=$(cat "$OUT/speed.txt")"
log "done: BLEU $(cat "$OUT/bleu.txt") (tokenized, compound-split: $(cat "$OUT/compound_bleu.txt"); $OUT/sacrebleu.json), $(cat "$OUT/speed.txt") tokens/s"
