#!/usr/bin/env bash
# Usage: recipes/generate.sh --data BIN --checkpoint CKPT --raw-ref REF --out DIR [options] [-- EXTRA_FAIRSEQ_GENERATE_ARGS...]
#
# Translate a split of a fairseq binary data set with fairseq-generate (beam search, plugin loaded
# with --user-dir), detokenize (sentencepiece), and score against the raw reference with sacrebleu.
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
#   -h, --help           show this help
#   -- ARGS...           passed unchanged to fairseq-generate after the defaults (e.g. --max-tokens 4000)
#
# Output:
#   DIR/hyp.txt          detokenized hypotheses, in the order of the split (sentence id)
#   DIR/bleu.txt         corpus BLEU (sacrebleu defaults: 13a tokenization, mixed case), just the number
#   DIR/sacrebleu.json   sacrebleu's JSON for BLEU (score, signature, verbose_score) plus chrF2
#   DIR/speed.txt        generation speed in target tokens/s (fairseq-generate's "Translated" line)
#   DIR/speed.json       the same with sentences, tokens, generation seconds and the command's wall time
#   DIR/generate.out     fairseq-generate's full output
#   DIR/.done            stamp; same configuration (incl. the checkpoint's sha256) skips at once,
#                        another one in the same DIR is an error
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DATA="" CKPT="" REF="" OUT="" SUBSET=test BEAM=5 LENPEN=1.0 BATCH_SIZE=64
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
python -c 'import sacrebleu' 2>/dev/null || die "the sacrebleu Python module is not installed"

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
if stamp_check "$OUT" --out; then
    log "$OUT already has this generation: skipping (BLEU $(cat "$OUT/bleu.txt"); delete $OUT/.done to redo)"
    exit 0
fi

# 1. translate.
if ! step_done "$OUT" generate; then
    ARGS=("$DATA" --user-dir "$QPLUGIN_USER_DIR" --task translation --path "$CKPT"
        --gen-subset "$SUBSET" --beam "$BEAM" --lenpen "$LENPEN" --batch-size "$BATCH_SIZE"
        --post-process sentencepiece)
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

# 2. hypotheses in sentence order; 3. BLEU and speed.
python - "$OUT" "$REF" "$WALL" <<'EOF'
import json
import re
import sys

import sacrebleu

out, ref_path, wall = sys.argv[1], sys.argv[2], float(sys.argv[3])
hyps = {}
speed = None
with open(f"{out}/generate.out", encoding="utf-8", newline="\n") as f:
    for line in f:
        line = line.rstrip("\n")
        if line.startswith("D-"):
            parts = line.split("\t")
            hyps[int(parts[0][2:])] = parts[2] if len(parts) > 2 else ""
        m = re.search(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s "
                      r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)", line)
        if m:
            speed = {
                "sentences": int(m.group(1).replace(",", "")),
                "tokens": int(m.group(2).replace(",", "")),
                "generation_s": float(m.group(3)),
                "sentences_per_s": float(m.group(4)),
                "tokens_per_s": float(m.group(5)),
            }
with open(ref_path, encoding="utf-8", newline="\n") as f:
    refs = f.read().split("\n")
if refs and refs[-1] == "":
    refs.pop()
if sorted(hyps) != list(range(len(refs))):
    sys.exit(f"ERROR: {len(hyps)} hypotheses (ids {min(hyps, default=None)}..{max(hyps, default=None)}) "
             f"do not match the {len(refs)} lines of the reference {ref_path}: wrong --raw-ref or --subset?")
if speed is None:
    sys.exit(f"ERROR: no 'Translated ... tokens/s' line in {out}/generate.out")
hyp_list = [hyps[i] for i in range(len(refs))]
with open(f"{out}/hyp.txt", "w", encoding="utf-8") as f:
    f.write("".join(h + "\n" for h in hyp_list))

bleu = sacrebleu.metrics.BLEU()
score = bleu.corpus_score(hyp_list, [refs])
result = json.loads(score.format(signature=str(bleu.get_signature()), is_json=True))
chrf = sacrebleu.metrics.CHRF()
result["chrF2"] = round(chrf.corpus_score(hyp_list, [refs]).score, 2)
result["chrF2_signature"] = str(chrf.get_signature())
with open(f"{out}/sacrebleu.json", "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, ensure_ascii=False)
    f.write("\n")
with open(f"{out}/bleu.txt", "w") as f:
    f.write(f"{score.score:.2f}\n")
speed["wall_s"] = wall
with open(f"{out}/speed.txt", "w") as f:
    f.write(f"{speed['tokens_per_s']:.1f}\n")
with open(f"{out}/speed.json", "w") as f:
    json.dump(speed, f, indent=1)
    f.write("\n")
print(f"BLEU {score.score:.2f} chrF2 {result['chrF2']:.2f} | {speed['sentences']} sentences, "
      f"{speed['tokens']} tokens in {speed['generation_s']:.1f}s ({speed['tokens_per_s']:.1f} tokens/s), "
      f"command wall {wall:.1f}s", file=sys.stderr)
EOF

stamp_done "$OUT" "bleu=$(cat "$OUT/bleu.txt")" "tokens_per_s=$(cat "$OUT/speed.txt")"
log "done: BLEU $(cat "$OUT/bleu.txt") ($OUT/sacrebleu.json), $(cat "$OUT/speed.txt") tokens/s"
