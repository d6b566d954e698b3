#!/usr/bin/env bash
# Usage: recipes/prepare_corpus.sh --src-dir DIR --out DIR [options]
#
# Turn a parallel corpus into a fairseq binary data set with one joint sentencepiece model.
#
# Reads {train,valid,test}.{SRC,TGT} from --src-dir, plain text or gzipped (.gz), one sentence per
# line; trains ONE joint unigram sentencepiece model on both sides of train (character_coverage=1.0),
# encodes all splits and binarizes them with fairseq-preprocess --joined-dictionary.
#
# Required:
#   --src-dir DIR        directory with train/valid/test .SRC/.TGT files (plain or .gz)
#   --out DIR            output directory (created)
# Options:
#   --src LANG           source language suffix (default: en)
#   --tgt LANG           target language suffix (default: de)
#   --vocab-size N       sentencepiece vocabulary size (default: 8000)
#   --train-lines N      use only the first N lines of train (default: all)
#   --workers N          fairseq-preprocess workers (default: 2)
#   -h, --help           show this help
#
# Output:
#   OUT/spm.model, OUT/spm.vocab     the joint sentencepiece model
#   OUT/raw/{train,valid,test}.{SRC,TGT}   untokenized text (valid/test are the BLEU references)
#   OUT/spm/{train,valid,test}.{SRC,TGT}   sentencepiece pieces
#   OUT/bin/                         fairseq binary data (dict.SRC.txt == dict.TGT.txt), --data for
#                                    train.sh / generate.sh
#   OUT/.done                        stamp with the configuration
#
# Idempotent: re-running with the same flags skips at once; an OUT made with other flags is an
# error (delete it or choose another --out); an interrupted run resumes at the unfinished sub-step.
# Uses spm_train/spm_encode if they are on PATH, else the sentencepiece Python module.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SRC_DIR="" OUT="" SRC=en TGT=de VOCAB_SIZE=8000 TRAIN_LINES="" WORKERS=2
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --src-dir) need_value "$1" $#; SRC_DIR=$2; shift 2 ;;
        --out) need_value "$1" $#; OUT=$2; shift 2 ;;
        --src) need_value "$1" $#; SRC=$2; shift 2 ;;
        --tgt) need_value "$1" $#; TGT=$2; shift 2 ;;
        --vocab-size) need_value "$1" $#; VOCAB_SIZE=$2; shift 2 ;;
        --train-lines) need_value "$1" $#; TRAIN_LINES=$2; shift 2 ;;
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
require_cmd python fairseq-preprocess

SRC_DIR=$(abspath "$SRC_DIR")
OUT=$(abspath "$OUT")
SPLITS=(train valid test)

# Check every input before any long work; name the missing file.
declare -A INPUT
for split in "${SPLITS[@]}"; do
    for lang in "$SRC" "$TGT"; do
        INPUT[$split.$lang]=$(find_input "$SRC_DIR" "$split.$lang") || {
            avail=$(cd "$SRC_DIR" && ls -- *.* 2>/dev/null | sed -n 's/^train\.\([^.]*\)\(\.gz\)\{0,1\}$/\1/p' | sort -u | tr '\n' ' ' || true)
            die "missing $SRC_DIR/$split.$lang (or $split.$lang.gz): no $SRC-$TGT pair there (train languages found: ${avail:-none})"
        }
    done
done

config_add recipe prepare_corpus
config_add src_dir "$SRC_DIR"
config_add src "$SRC"
config_add tgt "$TGT"
config_add vocab_size "$VOCAB_SIZE"
config_add train_lines "${TRAIN_LINES:-all}"
config_add spm "unigram character_coverage=1.0 joint"
if stamp_check "$OUT" --out; then
    log "$OUT is already prepared with this configuration: skipping (delete $OUT/.done to redo)"
    exit 0
fi
START=$(now_s)
log "preparing $SRC-$TGT from $SRC_DIR into $OUT (vocab $VOCAB_SIZE, train lines ${TRAIN_LINES:-all})"

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

# 2. joint sentencepiece model on both sides of train.
if ! step_done "$OUT" spm_model; then
    t=$(now_s)
    log "training the joint sentencepiece model (unigram, vocab $VOCAB_SIZE) on train.$SRC + train.$TGT"
    SPM_ARGS=(--input="$OUT/raw/train.$SRC,$OUT/raw/train.$TGT" --model_prefix="$OUT/spm"
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

# 3. encode all splits.
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
if ! step_done "$OUT" spm_encode; then
    t=$(now_s)
    mkdir -p "$OUT/spm"
    for split in "${SPLITS[@]}"; do
        for lang in "$SRC" "$TGT"; do
            if command -v spm_encode >/dev/null 2>&1; then
                spm_encode --model="$OUT/spm.model" --output_format=piece \
                    <"$OUT/raw/$split.$lang" >"$OUT/spm/$split.$lang"
            else
                python -c "$PY_SPM_ENCODE" "$OUT/spm.model" "$WORKERS" \
                    <"$OUT/raw/$split.$lang" >"$OUT/spm/$split.$lang"
            fi
            [[ $(wc -l <"$OUT/spm/$split.$lang") -eq $(wc -l <"$OUT/raw/$split.$lang") ]] ||
                die "sentencepiece encoding of $split.$lang lost lines"
        done
    done
    step_mark "$OUT" spm_encode
    log "encoded all splits in $(elapsed_since "$t")s"
fi

# 4. binarize.
if ! step_done "$OUT" bin; then
    t=$(now_s)
    rm -rf "$OUT/bin"
    log "binarizing with fairseq-preprocess --joined-dictionary --workers $WORKERS"
    fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" \
        --trainpref "$OUT/spm/train" --validpref "$OUT/spm/valid" --testpref "$OUT/spm/test" \
        --destdir "$OUT/bin" --joined-dictionary --workers "$WORKERS" \
        >"$OUT/preprocess.log" 2>&1 || {
        tail -n 20 "$OUT/preprocess.log" >&2
        die "fairseq-preprocess failed (full log: $OUT/preprocess.log)"
    }
    cp "$OUT/spm.model" "$OUT/spm.vocab" "$OUT/bin/"
    step_mark "$OUT" bin
    log "binarized in $(elapsed_since "$t")s ($(wc -l <"$OUT/bin/dict.$SRC.txt") dictionary entries)"
fi

stamp_done "$OUT" "elapsed_s=$(elapsed_since "$START")"
log "done in $(elapsed_since "$START")s: data $OUT/bin, references $OUT/raw/{valid,test}.$TGT, model $OUT/spm.model"
