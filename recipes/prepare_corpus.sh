#!/usr/bin/env bash
# Usage: recipes/prepare_corpus.sh --src-dir DIR --out DIR [options]
#
# Turn a parallel corpus into a fairseq binary data set with one joint subword model: sentencepiece
# (the default) or BPE (subword-nmt) on Moses-tokenized text, as for WMT14.
#
# Reads {train,valid,test}.{SRC,TGT} from --src-dir, plain text or gzipped (.gz), one sentence per
# line; optionally Moses-tokenizes them; trains ONE joint subword model on both sides of train
# (sentencepiece unigram with character_coverage=1.0, or BPE with subword-nmt); encodes all splits;
# optionally cleans train (clean-corpus-n: length ratio, max length); binarizes with
# fairseq-preprocess --joined-dictionary.
#
# Required:
#   --src-dir DIR        directory with train/valid/test .SRC/.TGT files (plain or .gz)
#   --out DIR            output directory (created)
# Options:
#   --src LANG           source language suffix (default: en)
#   --tgt LANG           target language suffix (default: de)
#   --subword spm|bpe    joint sentencepiece model (default) or joint BPE (subword-nmt)
#   --vocab-size N       sentencepiece vocabulary size (default: 8000; --subword spm)
#   --bpe-merges N       BPE merge operations (default: 32000; --subword bpe)
#   --tokenize moses|none  Moses tokenization before the subword model: normalize punctuation,
#                        remove non-printing characters, tokenizer -a (default: moses for bpe,
#                        none for spm)
#   --clean-ratio R      drop train pairs whose subword lengths differ by more than a factor R
#                        (clean-corpus-n -ratio; default: no cleaning; WMT: 1.5)
#   --max-len N          drop train pairs with a side longer than N subwords (default: no limit;
#                        WMT: 250)
#   --train-lines N      use only the first N lines of train (default: all)
#   --workers N          fairseq-preprocess, tokenizer and apply-bpe workers (default: 2)
#   -h, --help           show this help
#
# Output:
#   OUT/raw/{train,valid,test}.{SRC,TGT}   untokenized text (valid/test are the BLEU references)
#   OUT/tok/...                      Moses-tokenized text (--tokenize moses)
#   OUT/spm.model, OUT/spm.vocab     the joint sentencepiece model (spm); pieces in OUT/spm/
#   OUT/bpe.codes                    the joint BPE codes (bpe); encoded text in OUT/bpe/
#   OUT/bin/                         fairseq binary data (dict.SRC.txt == dict.TGT.txt), --data for
#                                    train.sh / generate.sh; also a copy of the subword model and
#                                    preprocessing.txt (subword=, tokenize=, src=, tgt=), from which
#                                    generate.sh knows how to undo subwords and tokenization
#   OUT/.done                        stamp with the configuration
#
# Idempotent: re-running with the same flags skips at once; an OUT made with other flags is an
# error (delete it or choose another --out); an interrupted run resumes at the unfinished sub-step.
# Uses spm_train/spm_encode if they are on PATH, else the sentencepiece Python module.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SRC_DIR="" OUT="" SRC=en TGT=de VOCAB_SIZE=8000 TRAIN_LINES="" WORKERS=2
SUBWORD=spm BPE_MERGES=32000 TOKENIZE="" CLEAN_RATIO="" MAX_LEN=""
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --src-dir) need_value "$1" $#; SRC_DIR=$2; shift 2 ;;
        --out) need_value "$1" $#; OUT=$2; shift 2 ;;
        --src) need_value "$1" $#; SRC=$2; shift 2 ;;
        --tgt) need_value "$1" $#; TGT=$2; shift 2 ;;
        --vocab-size) need_value "$1" $#; VOCAB_SIZE=$2; shift 2 ;;
        --train-lines) need_value "$1" $#; TRAIN_LINES=$2; shift 2 ;;
        --subword) need_value "$1" $#; SUBWORD=$2; shift 2 ;;
        --bpe-merges) need_value "$1" $#; BPE_MERGES=$2; shift 2 ;;
        --tokenize) need_value "$1" $#; TOKENIZE=$2; shift 2 ;;
        --clean-ratio) need_value "$1" $#; CLEAN_RATIO=$2; shift 2 ;;
        --max-len) need_value "$1" $#; MAX_LEN=$2; shift 2 ;;
        --workers) need_value "$1" $#; WORKERS=$2; shift 2 ;;
        *) arg_error "unknown argument '$1'" ;;
    esac
done

[[ -n $SRC_DIR ]] || arg_error "--src-dir is required"
[[ -n $OUT ]] || arg_error "--out is required"
[[ -d $SRC_DIR ]] || arg_error "--src-dir $SRC_DIR is not a directory"
[[ $SRC =~ ^[A-Za-z0-9_-]+$ ]] || arg_error "--src must be a language suffix like 'en', got '$SRC'"
[[ $TGT =~ ^[A-Za-z0-9_-]+$ ]] || arg_error "--tgt must be a language suffix like 'de', got '$TGT'"
[[ $SRC != "$TGT" ]] || arg_error "--src and --tgt must differ (both '$SRC')"
check_int --vocab-size "$VOCAB_SIZE" 100
[[ -z $TRAIN_LINES ]] || check_int --train-lines "$TRAIN_LINES" 1
check_int --workers "$WORKERS" 1
[[ $SUBWORD == spm || $SUBWORD == bpe ]] || arg_error "--subword must be spm or bpe, got '$SUBWORD'"
check_int --bpe-merges "$BPE_MERGES" 1
if [[ -z $TOKENIZE ]]; then
    if [[ $SUBWORD == bpe ]]; then TOKENIZE=moses; else TOKENIZE=none; fi
fi
[[ $TOKENIZE == moses || $TOKENIZE == none ]] || arg_error "--tokenize must be moses or none, got '$TOKENIZE'"
[[ -z $CLEAN_RATIO ]] || check_number --clean-ratio "$CLEAN_RATIO"
[[ -z $MAX_LEN ]] || check_int --max-len "$MAX_LEN" 1
require_cmd python fairseq-preprocess
[[ $SUBWORD == spm ]] || require_cmd subword-nmt
[[ $TOKENIZE == none ]] || python -c 'import sacremoses' 2>/dev/null ||
    die "--tokenize moses needs the sacremoses Python module (pip install sacremoses)"
TEXTPREP="$RECIPES_DIR/../fairseq_qplugin/textprep.py"

SRC_DIR=$(abspath "$SRC_DIR")
OUT=$(abspath "$OUT")
SPLITS=(train valid test)

# Check every input before any long work; name the missing file.
declare -A INPUT
for split in "${SPLITS[@]}"; do
    for lang in "$SRC" "$TGT"; do
        INPUT[$split.$lang]=$(find_input "$SRC_DIR" "$split.$lang") || {
            avail=$(cd "$SRC_DIR" && ls -- *.* 2>/dev/null | sed -n 's/^train\.\([^.]*\)\(\.gz\)\{0,1\}$/\1/p' | sort -u | paste -sd ' ' || true)
            die "missing $SRC_DIR/$split.$lang (or $split.$lang.gz): no $SRC-$TGT pair there (train languages found: ${avail:-none})"
        }
    done
done

config_add recipe prepare_corpus
config_add src_dir "$SRC_DIR"
config_add src "$SRC"
config_add tgt "$TGT"
# (the keys and their order for spm are those from before --subword, so older OUTs still match)
[[ $SUBWORD == bpe ]] || config_add vocab_size "$VOCAB_SIZE"
config_add train_lines "${TRAIN_LINES:-all}"
if [[ $SUBWORD == spm ]]; then
    config_add spm "unigram character_coverage=1.0 joint"
else
    config_add subword bpe
    config_add bpe_merges "$BPE_MERGES"
fi
config_add_nondefault tokenize "$TOKENIZE" none
config_add_nondefault clean_ratio "$CLEAN_RATIO" ""
config_add_nondefault max_len "$MAX_LEN" ""
if stamp_check "$OUT" --out; then
    log "$OUT is already prepared with this configuration: skipping (delete $OUT/.done to redo)"
    exit 0
fi
START=$(now_s)
if [[ $SUBWORD == spm ]]; then
    SUBWORD_MODEL=spm.model SUBWORD_DESC="sentencepiece vocab $VOCAB_SIZE"
else
    SUBWORD_MODEL=bpe.codes SUBWORD_DESC="BPE $BPE_MERGES merges"
fi
log "preparing $SRC-$TGT from $SRC_DIR into $OUT ($SUBWORD_DESC, tokenize $TOKENIZE, train lines ${TRAIN_LINES:-all})"

# 1. raw text (decompressed, train truncated), line counts checked.
if ! step_done "$OUT" raw; then
    mkdir -p "$OUT/raw"
    for split in "${SPLITS[@]}"; do
        for lang in "$SRC" "$TGT"; do
            if [[ $split == train && -n $TRAIN_LINES ]]; then
                # (head closing the pipe early is fine: ignore SIGPIPE of the decompressor)
                { cat_input "${INPUT[$split.$lang]}" || true; } | head -n "$TRAIN_LINES" >"$OUT/raw/$split.$lang"
            else
                cat_input "${INPUT[$split.$lang]}" >"$OUT/raw/$split.$lang"
            fi
        done
        ns=$(wc -l <"$OUT/raw/$split.$SRC")
        nt=$(wc -l <"$OUT/raw/$split.$TGT")
        [[ $ns -eq $nt ]] || die "$split.$SRC has $ns lines but $split.$TGT has $nt: not a parallel corpus"
        [[ $ns -gt 0 ]] || die "$split.$SRC is empty"
        log "raw/$split: $ns sentence pairs"
    done
    step_mark "$OUT" raw
fi

# 2. Moses tokenization (optional).
TEXT=raw
if [[ $TOKENIZE == moses ]]; then
    TEXT=tok
    if ! step_done "$OUT" tokenize; then
        t=$(now_s)
        mkdir -p "$OUT/tok"
        for split in "${SPLITS[@]}"; do
            for lang in "$SRC" "$TGT"; do
                python "$TEXTPREP" tokenize --lang "$lang" --workers "$WORKERS" \
                    <"$OUT/raw/$split.$lang" >"$OUT/tok/$split.$lang"
                [[ $(wc -l <"$OUT/tok/$split.$lang") -eq $(wc -l <"$OUT/raw/$split.$lang") ]] ||
                    die "Moses tokenization of $split.$lang lost lines"
            done
        done
        step_mark "$OUT" tokenize
        log "Moses-tokenized all splits in $(elapsed_since "$t")s"
    fi
fi

# 3. joint subword model on both sides of train.
if [[ $SUBWORD == spm ]] && ! step_done "$OUT" spm_model; then
    t=$(now_s)
    log "training the joint sentencepiece model (unigram, vocab $VOCAB_SIZE) on train.$SRC + train.$TGT"
    SPM_ARGS=(--input="$OUT/$TEXT/train.$SRC,$OUT/$TEXT/train.$TGT" --model_prefix="$OUT/spm"
        --vocab_size="$VOCAB_SIZE" --model_type=unigram --character_coverage=1.0
        --input_sentence_size=2000000 --shuffle_input_sentence=true --num_threads="$WORKERS"
        --minloglevel=1)
    if command -v spm_train >/dev/null 2>&1; then
        spm_train "${SPM_ARGS[@]}"
    else
        python - "${SPM_ARGS[@]}" <<'EOF'
import sys
import sentencepiece as spm
spm.SentencePieceTrainer.train(**dict(a[2:].split("=", 1) for a in sys.argv[1:]))
EOF
    fi
    require_file "$OUT/spm.model" "sentencepiece model"
    step_mark "$OUT" spm_model
    log "sentencepiece model done in $(elapsed_since "$t")s"
fi
if [[ $SUBWORD == bpe ]] && ! step_done "$OUT" bpe_model; then
    t=$(now_s)
    log "learning joint BPE ($BPE_MERGES merges, subword-nmt) on $TEXT/train.$SRC + $TEXT/train.$TGT"
    cat "$OUT/$TEXT/train.$SRC" "$OUT/$TEXT/train.$TGT" |
        subword-nmt learn-bpe --symbols "$BPE_MERGES" >"$OUT/bpe.codes.tmp" 2>"$OUT/learn_bpe.log" || {
        tail -n 20 "$OUT/learn_bpe.log" >&2
        die "subword-nmt learn-bpe failed (log: $OUT/learn_bpe.log)"
    }
    mv -f "$OUT/bpe.codes.tmp" "$OUT/bpe.codes"
    step_mark "$OUT" bpe_model
    log "BPE codes done in $(elapsed_since "$t")s ($(($(wc -l <"$OUT/bpe.codes") - 1)) merges)"
fi

# 4. encode all splits.
PY_SPM_ENCODE='
import sys
import sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
lines = sys.stdin.buffer.read().decode("utf-8").split("\n")
if lines and lines[-1] == "":
    lines.pop()
pieces = sp.encode(lines, out_type=str, num_threads=int(sys.argv[2]))
sys.stdout.buffer.write("".join(" ".join(p) + "\n" for p in pieces).encode("utf-8"))
'
ENC=$SUBWORD  # OUT/spm or OUT/bpe
if ! step_done "$OUT" "${SUBWORD}_encode"; then
    t=$(now_s)
    mkdir -p "$OUT/$ENC"
    for split in "${SPLITS[@]}"; do
        for lang in "$SRC" "$TGT"; do
            if [[ $SUBWORD == bpe ]]; then
                subword-nmt apply-bpe --codes "$OUT/bpe.codes" --num-workers "$WORKERS" \
                    <"$OUT/$TEXT/$split.$lang" >"$OUT/$ENC/$split.$lang"
            elif command -v spm_encode >/dev/null 2>&1; then
                spm_encode --model="$OUT/spm.model" --output_format=piece \
                    <"$OUT/$TEXT/$split.$lang" >"$OUT/$ENC/$split.$lang"
            else
                python -c "$PY_SPM_ENCODE" "$OUT/spm.model" "$WORKERS" \
                    <"$OUT/$TEXT/$split.$lang" >"$OUT/$ENC/$split.$lang"
            fi
            [[ $(wc -l <"$OUT/$ENC/$split.$lang") -eq $(wc -l <"$OUT/raw/$split.$lang") ]] ||
                die "$SUBWORD encoding of $split.$lang lost lines"
        done
    done
    step_mark "$OUT" "${SUBWORD}_encode"
    log "encoded all splits in $(elapsed_since "$t")s"
fi

# 5. clean train (optional): clean-corpus-n on the subword tokens, as fairseq's WMT14 script does.
TRAIN_PREF="$OUT/$ENC/train"
if [[ -n $CLEAN_RATIO || -n $MAX_LEN ]]; then
    TRAIN_PREF="$OUT/$ENC/train.clean"
    if ! step_done "$OUT" clean; then
        msg=$(python "$TEXTPREP" clean "$OUT/$ENC/train" "$SRC" "$TGT" "$TRAIN_PREF" \
            --ratio "${CLEAN_RATIO:-0}" --min-len 1 --max-len "${MAX_LEN:-1000000000}" 2>&1) || die "cleaning failed: $msg"
        log "$msg"
        [[ -s $TRAIN_PREF.$SRC ]] ||
            die "cleaning kept no train pair (--clean-ratio ${CLEAN_RATIO:-none}, --max-len ${MAX_LEN:-none})"
        step_mark "$OUT" clean
    fi
fi

# 6. binarize.
if ! step_done "$OUT" bin; then
    t=$(now_s)
    rm -rf "$OUT/bin"
    log "binarizing with fairseq-preprocess --joined-dictionary --workers $WORKERS"
    fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" \
        --trainpref "$TRAIN_PREF" --validpref "$OUT/$ENC/valid" --testpref "$OUT/$ENC/test" \
        --destdir "$OUT/bin" --joined-dictionary --workers "$WORKERS" \
        >"$OUT/preprocess.log" 2>&1 || {
        tail -n 20 "$OUT/preprocess.log" >&2
        die "fairseq-preprocess failed (full log: $OUT/preprocess.log)"
    }
    if [[ $SUBWORD == spm ]]; then
        cp "$OUT/spm.model" "$OUT/spm.vocab" "$OUT/bin/"
    else
        cp "$OUT/bpe.codes" "$OUT/bin/"
    fi
    printf 'subword=%s\ntokenize=%s\nsrc=%s\ntgt=%s\n' "$SUBWORD" "$TOKENIZE" "$SRC" "$TGT" \
        >"$OUT/bin/preprocessing.txt"
    step_mark "$OUT" bin
    log "binarized in $(elapsed_since "$t")s ($(wc -l <"$OUT/bin/dict.$SRC.txt") dictionary entries)"
fi

stamp_done "$OUT" "elapsed_s=$(elapsed_since "$START")"
log "done in $(elapsed_since "$START")s: data $OUT/bin, references $OUT/raw/{valid,test}.$TGT, subword model $OUT/$SUBWORD_MODEL"
