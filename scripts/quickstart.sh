#!/usr/bin/env bash
# The README's five-minute start: from a trained fp32 fairseq `transformer` checkpoint,
#   1. quantize it post-training to 8-bit weights and pack it (fairseq-qpack --method int --bits 8),
#   2. translate the test split with the packed file and score it (recipes/generate.sh: sacrebleu),
#   3. the QAT path: fine-tune it QUICKSTART_UPDATES updates at 4 bits (transformer_int8), pack it,
#      translate and score it.
#
#   bash scripts/quickstart.sh CHECKPOINT DATA_BIN RAW_REF [OUT]
#   bash scripts/quickstart.sh exp/demo/fp32/checkpoint_best.pt exp/demo/data/bin exp/demo/data/raw/test.de
#
# DATA_BIN: the fairseq-preprocess output the model was trained on (dictionaries, test split);
# RAW_REF: the untokenized reference of the test split. The architecture flags of the fine-tuning are
# read from the checkpoint. OUT (default exp/quickstart) gets every file; each step prints its time.
# Paths are relative to the current directory. Commands (fairseq-qpack, fairseq-train) come from
# $QPLUGIN_VENV (default: the repository's .venv) when it exists, else from PATH. The plugin given to
# fairseq (--user-dir) is this repository's fairseq_qplugin, or the package directory QPLUGIN_USER_DIR
# names, e.g. the installed one: QPLUGIN_USER_DIR=$(python -c 'import fairseq_qplugin as p, os;
# print(os.path.dirname(p.__file__))') from outside the repository.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
ckpt=$1 bin=$2 ref=$3 out=${4:-exp/quickstart}
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${QPLUGIN_VENV:-$repo/.venv}
[ -x "$venv/bin/fairseq-qpack" ] && export PATH="$(cd "$venv" && pwd)/bin:$PATH"
export QPLUGIN_USER_DIR=${QPLUGIN_USER_DIR:-$repo/fairseq_qplugin}  # for the recipes too
mkdir -p "$out"
echo "$(date '+%F %T') | quickstart | plugin $(python -c 'import sys; sys.path.insert(0, sys.argv[1])
import fairseq_qplugin as p; print(p.__version__, p.__file__.rsplit("/", 1)[0])' "$(dirname "$QPLUGIN_USER_DIR")")" >&2
start=$(date +%s)
step() { echo "$(date '+%F %T') | quickstart | $* ($(( $(date +%s) - start )) s so far)" >&2; }

step "1/3 post-training 8-bit: quantize and pack"
fairseq-qpack "$ckpt" "$out/ptq-int8.pt" --method int --bits 8 --data "$bin" > "$out/ptq-int8.size.md"
step "2/3 translate the test split and score"
"$repo/recipes/generate.sh" --data "$bin" --checkpoint "$out/ptq-int8.pt" --raw-ref "$ref" --out "$out/gen-ptq-int8"
step "post-training 8-bit: BLEU $(cat "$out/gen-ptq-int8/bleu.txt")"

step "3/3 quantization-aware fine-tuning at 4 bits (${QUICKSTART_UPDATES:-50} updates), pack, translate, score"
mapfile -t arch < <(python - "$ckpt" "$(dirname "$QPLUGIN_USER_DIR")" <<'EOF'
import sys
sys.path.insert(0, sys.argv[2])
import torch, fairseq_qplugin  # noqa: F401,E401 (checkpoints load under torch >= 2.6)
m = torch.load(sys.argv[1], map_location="cpu")["cfg"]["model"]
get = (lambda k: m.get(k)) if isinstance(m, dict) else (lambda k: getattr(m, k, None))
for side in ("encoder", "decoder"):
    for k in ("layers", "embed_dim", "ffn_embed_dim", "attention_heads"):
        print(f"--{side}-{k.replace('_', '-')}"); print(get(f"{side}_{k}"))
    if get(f"{side}_normalize_before"):
        print(f"--{side}-normalize-before")
for k in ("share_all_embeddings", "share_decoder_input_output_embed"):
    if get(k):
        print("--" + k.replace("_", "-"))
EOF
)
fairseq-train "$bin" --user-dir "$QPLUGIN_USER_DIR" --arch transformer_int8 "${arch[@]}" --quant-bits 4 \
    --finetune-from-model "$ckpt" --optimizer adam --adam-betas '(0.9,0.98)' --lr 2e-4 --lr-scheduler fixed \
    --criterion label_smoothed_cross_entropy --label-smoothing 0.1 --max-tokens 4096 \
    --max-update "${QUICKSTART_UPDATES:-50}" --save-dir "$out/qat-int4" --no-epoch-checkpoints \
    --disable-validation --log-format simple --log-interval 10 > "$out/qat-int4.log" 2>&1
fairseq-qpack "$out/qat-int4/checkpoint_last.pt" "$out/qat-int4.pt" > "$out/qat-int4.size.md"
"$repo/recipes/generate.sh" --data "$bin" --checkpoint "$out/qat-int4.pt" --raw-ref "$ref" --out "$out/gen-qat-int4"
step "QAT 4-bit: BLEU $(cat "$out/gen-qat-int4/bleu.txt"); done"
