#!/usr/bin/env bash
# Usage: recipes/prepare_wmt14.sh --out DIR [--local-dir DIR] [options]
#
# WMT14 English-German as in fairseq's examples/translation/prepare-wmt14en2de.sh and the papers
# (Vaswani et al. 2017; the quantization papers of METHODS.md): download the corpora (or take them
# from --local-dir), assemble train / valid / test, then run prepare_corpus.sh on them: Moses
# tokenization and joint BPE (or joint sentencepiece), clean-corpus-n on train (ratio 1.5, 1-250
# subwords), fairseq-preprocess --joined-dictionary.
#
# Corpora (the archive, and the files used from it):
#   training-parallel-europarl-v7.tgz   training/europarl-v7.de-en.{en,de}          (wmt13)
#   training-parallel-commoncrawl.tgz   commoncrawl.de-en.{en,de}                   (wmt13)
#   training-parallel-nc-v12.tgz        training/news-commentary-v12.de-en.{en,de}  (wmt17)
#   dev.tgz                             dev/newstest2013.{en,de}                    (wmt17) -> valid
#   test-full.tgz                       test-full/newstest2014-deen-{src,ref}.{en,de}.sgm (wmt14)
#                                       -> test (3003 sentences, the <seg> texts)
# train is the three training corpora concatenated (about 4.5M pairs). valid is newstest2013
# (fairseq's script instead holds out every 100th train line; newstest2013 is the papers' dev set).
#
# Required:
#   --out DIR            output directory (created): DIR/orig (the extracted files), DIR/corpus
#                        ({train,valid,test}.{SRC,TGT}, raw text), DIR/data (prepare_corpus.sh
#                        output: DIR/data/bin is the --data of train.sh, DIR/data/raw/test.TGT the
#                        --raw-ref of generate.sh)
# Options:
#   --local-dir DIR      take the archives (or their extracted files, same relative paths) from DIR
#                        instead of downloading them
#   --src LANG, --tgt LANG  en and de (default) or de and en
#   --subword bpe|spm    joint BPE on Moses-tokenized text (default) or joint sentencepiece on raw text
#   --bpe-merges N       BPE merges (default: 32000; fairseq's script uses 40000)
#   --vocab-size N       sentencepiece vocabulary (default: 32000; --subword spm)
#   --train-lines N      keep only the first N train pairs (default: all; for quick trials)
#   --workers N          parallel workers (default: 2)
#   -h, --help           show this help
#
# Idempotent like every recipe: the same flags again skip at once; other flags in the same --out
# are an error; an interrupted run resumes (downloads and extractions already done are kept).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

OUT="" LOCAL_DIR="" SRC=en TGT=de SUBWORD=bpe BPE_MERGES=32000 VOCAB_SIZE=32000 TRAIN_LINES="" WORKERS=2
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --out) need_value "$1" $#; OUT=$2; shift 2 ;;
        --local-dir) need_value "$1" $#; LOCAL_DIR=$2; shift 2 ;;
        --src) need_value "$1" $#; SRC=$2; shift 2 ;;
        --tgt) need_value "$1" $#; TGT=$2; shift 2 ;;
        --subword) need_value "$1" $#; SUBWORD=$2; shift 2 ;;
        --bpe-merges) need_value "$1" $#; BPE_MERGES=$2; shift 2 ;;
        --vocab-size) need_value "$1" $#; VOCAB_SIZE=$2; shift 2 ;;
        --train-lines) need_value "$1" $#; TRAIN_LINES=$2; shift 2 ;;
        --workers) need_value "$1" $#; WORKERS=$2; shift 2 ;;
        *) arg_error "unknown argument '$1'" ;;
    esac
done

[[ -n $OUT ]] || arg_error "--out is required"
[[ "$SRC-$TGT" == en-de || "$SRC-$TGT" == de-en ]] ||
    arg_error "WMT14 en-de has the language pair en-de or de-en only (--src $SRC --tgt $TGT)"
[[ $SUBWORD == bpe || $SUBWORD == spm ]] || arg_error "--subword must be bpe or spm, got '$SUBWORD'"
check_int --bpe-merges "$BPE_MERGES" 1
check_int --vocab-size "$VOCAB_SIZE" 100
[[ -z $TRAIN_LINES ]] || check_int --train-lines "$TRAIN_LINES" 1
check_int --workers "$WORKERS" 1
if [[ -n $LOCAL_DIR ]]; then
    [[ -d $LOCAL_DIR ]] || arg_error "--local-dir $LOCAL_DIR is not a directory"
    LOCAL_DIR=$(abspath "$LOCAL_DIR")
fi
OUT=$(abspath "$OUT")
TEXTPREP="$RECIPES_DIR/../fairseq_qplugin/textprep.py"

# archive | URL | files used from it (relative to the archive root; {L} is each language)
SOURCES=(
    "training-parallel-europarl-v7.tgz|http://statmt.org/wmt13/training-parallel-europarl-v7.tgz|training/europarl-v7.de-en.{L}"
    "training-parallel-commoncrawl.tgz|http://statmt.org/wmt13/training-parallel-commoncrawl.tgz|commoncrawl.de-en.{L}"
    "training-parallel-nc-v12.tgz|http://data.statmt.org/wmt17/translation-task/training-parallel-nc-v12.tgz|training/news-commentary-v12.de-en.{L}"
    "dev.tgz|http://data.statmt.org/wmt17/translation-task/dev.tgz|dev/newstest2013.{L}"
    "test-full.tgz|http://statmt.org/wmt14/test-full.tgz|test-full/newstest2014-deen-src.$SRC.sgm test-full/newstest2014-deen-ref.$TGT.sgm"
)
TRAIN_CORPORA=(training/europarl-v7.de-en commoncrawl.de-en training/news-commentary-v12.de-en)

# members ARCHIVE_ENTRY -> the relative paths of the files used (one per line)
members() {
    local f
    for f in ${1##*|}; do
        if [[ $f == *"{L}"* ]]; then
            printf '%s\n' "${f//\{L\}/$SRC}" "${f//\{L\}/$TGT}"
        else
            printf '%s\n' "$f"
        fi
    done
}

# Check every input before any long work: with --local-dir each archive or all its files must be there.
if [[ -n $LOCAL_DIR ]]; then
    missing=()
    for entry in "${SOURCES[@]}"; do
        IFS='|' read -r archive url _ <<<"$entry"
        [[ -f $LOCAL_DIR/$archive ]] && continue
        while IFS= read -r m; do
            [[ -f $LOCAL_DIR/$m ]] || missing+=("$archive (or its file $m; from $url)")
        done < <(members "$entry")
    done
    [[ ${#missing[@]} -eq 0 ]] ||
        die "--local-dir $LOCAL_DIR lacks: ${missing[*]}"
else
    command -v curl >/dev/null 2>&1 || command -v wget >/dev/null 2>&1 ||
        die "neither curl nor wget is on PATH to download the corpora; download them and give --local-dir"
fi
require_cmd python tar

config_add recipe prepare_wmt14
config_add source "${LOCAL_DIR:-download}"
config_add src "$SRC"
config_add tgt "$TGT"
config_add valid newstest2013
config_add test newstest2014
config_add train_lines "${TRAIN_LINES:-all}"
config_add subword "$SUBWORD"
if [[ $SUBWORD == bpe ]]; then config_add bpe_merges "$BPE_MERGES"; else config_add vocab_size "$VOCAB_SIZE"; fi
if stamp_check "$OUT" --out; then
    log "$OUT is already prepared with this configuration: skipping (delete $OUT/.done to redo)"
    exit 0
fi
START=$(now_s)

# 1. the files used, under OUT/orig (downloaded or taken from --local-dir, extracted).
if ! step_done "$OUT" orig; then
    mkdir -p "$OUT/orig"
    for entry in "${SOURCES[@]}"; do
        IFS='|' read -r archive url _ <<<"$entry"
        mapfile -t files < <(members "$entry")
        if [[ -n $LOCAL_DIR && ! -f $LOCAL_DIR/$archive ]]; then
            for m in "${files[@]}"; do
                mkdir -p "$(dirname "$OUT/orig/$m")"
                ln -sf "$LOCAL_DIR/$m" "$OUT/orig/$m"
            done
            log "$archive: using the extracted files in $LOCAL_DIR"
            continue
        fi
        tgz=$LOCAL_DIR/$archive
        if [[ -z $LOCAL_DIR ]]; then
            tgz=$OUT/orig/$archive
            if [[ ! -f $tgz ]]; then
                log "downloading $url"
                if command -v curl >/dev/null 2>&1; then
                    curl -fL --retry 3 -o "$tgz.part" "$url" || die "downloading $url failed"
                else
                    wget -O "$tgz.part" "$url" || die "downloading $url failed"
                fi
                mv -f "$tgz.part" "$tgz"
            fi
        fi
        log "extracting ${files[*]} from $tgz"
        # (members are stored as "dir/file" or "./dir/file" depending on the tar that made the archive)
        tar -xzf "$tgz" -C "$OUT/orig" "${files[@]}" 2>/dev/null ||
            tar -xzf "$tgz" -C "$OUT/orig" "${files[@]/#/./}" 2>/dev/null ||
            die "$tgz does not hold ${files[*]} (is it the WMT archive $archive?)"
    done
    step_mark "$OUT" orig
fi

# 2. OUT/corpus/{train,valid,test}.{SRC,TGT}, raw text.
if ! step_done "$OUT" corpus; then
    mkdir -p "$OUT/corpus"
    for lang in "$SRC" "$TGT"; do
        : >"$OUT/corpus/train.$lang"
    done
    for c in "${TRAIN_CORPORA[@]}"; do
        ns=$(wc -l <"$OUT/orig/$c.$SRC")
        nt=$(wc -l <"$OUT/orig/$c.$TGT")
        [[ $ns -eq $nt ]] || die "$OUT/orig/$c.$SRC has $ns lines but $c.$TGT has $nt: a broken download?"
        for lang in "$SRC" "$TGT"; do cat "$OUT/orig/$c.$lang" >>"$OUT/corpus/train.$lang"; done
        log "train: $ns pairs from $c"
    done
    for lang in "$SRC" "$TGT"; do
        cp "$OUT/orig/dev/newstest2013.$lang" "$OUT/corpus/valid.$lang"
    done
    python "$TEXTPREP" sgm <"$OUT/orig/test-full/newstest2014-deen-src.$SRC.sgm" >"$OUT/corpus/test.$SRC"
    python "$TEXTPREP" sgm <"$OUT/orig/test-full/newstest2014-deen-ref.$TGT.sgm" >"$OUT/corpus/test.$TGT"
    step_mark "$OUT" corpus
fi

# 3. tokenize, subwords, clean, binarize.
ARGS=(--src-dir "$OUT/corpus" --out "$OUT/data" --src "$SRC" --tgt "$TGT" --subword "$SUBWORD"
    --clean-ratio 1.5 --max-len 250 --workers "$WORKERS")
if [[ $SUBWORD == bpe ]]; then ARGS+=(--bpe-merges "$BPE_MERGES"); else ARGS+=(--vocab-size "$VOCAB_SIZE"); fi
[[ -z $TRAIN_LINES ]] || ARGS+=(--train-lines "$TRAIN_LINES")
"$RECIPES_DIR/prepare_corpus.sh" "${ARGS[@]}"

stamp_done "$OUT" "elapsed_s=$(elapsed_since "$START")"
log "done in $(elapsed_since "$START")s: data $OUT/data/bin, test reference $OUT/data/raw/test.$TGT"
