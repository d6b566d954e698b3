#!/usr/bin/env bash
# Mixed-precision quantization-aware training on one GPU, every quantized architecture:
#
#   bash scripts/gpu_check.sh      # about 5 minutes on one GPU; exits 0 at once without one
#
# On the shipped en-de corpus (data/debian-doc-en-de: 20k training pairs, 100 test sentences, a 4k
# sentencepiece vocabulary) it trains a small fp32 transformer (300 updates), then fine-tunes it for
# 50 updates with each architecture under each precision:
#   int8     transformer_int8, 4-bit weights, 8-bit input activations (--quant-act input)
#   kmeans   transformer_kmeans, 4-bit k-means weight sharing
#   bcq-pnr  transformer_bcq, 3 bits, trained with pNR (--optimizer pnr_adam)
# x --amp (fp32 weights, fp16 autocast), --bf16, --memory-efficient-fp16. pNR needs the optimizer to
# see the model's own weights, which fairseq's --fp16/--bf16 hide behind fp32 copies, so bcq-pnr runs
# --bf16 as --bf16 --memory-efficient-bf16.
# Each run must log finite training losses, the last lower than the first (--log-interval 10), and
# its checkpoint must pack (fairseq-qpack) and translate the test sentences exactly as the QAT
# checkpoint does (same tokens, scores within 1e-3; both generated on the CPU, where the packed
# kernels run). Prints one line per run (with fairseq's updates/s and tokens/s of its last 10
# updates) and exits 1 if any check failed.
#
# Environment: GPU_CHECK_DIR (default exp/gpu_check) holds the data, checkpoints and logs;
# GPU_CHECK_ARCHS / GPU_CHECK_PRECISIONS restrict the runs (space-separated names from above:
# amp bf16 memory-efficient-fp16).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${QPLUGIN_VENV:-.venv}
[[ ! -x $venv/bin/python ]] || export PATH="$(cd "$venv/bin" && pwd):$PATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "$(date '+%F %T') | gpu_check | $*" >&2; }

cuda=$(python -c 'import torch; print(torch.cuda.is_available())') ||
    { log "python cannot import torch: run scripts/setup_env.sh (or set QPLUGIN_VENV)"; exit 1; }
if [[ $cuda != True ]]; then
    echo "gpu_check: skipped: no CUDA GPU here (torch.cuda.is_available() is False); nothing was checked"
    exit 0
fi
out=${GPU_CHECK_DIR:-exp/gpu_check}
archs=(${GPU_CHECK_ARCHS:-int8 kmeans bcq-pnr})
precisions=(${GPU_CHECK_PRECISIONS:-amp bf16 memory-efficient-fp16})
start=$(date +%s)
log "GPU: $(python -c 'import torch; print(torch.cuda.get_device_name(0))')"

# 1. data: 20k training pairs, 100 validation and test sentences
src=$out/src
mkdir -p "$src"
for lang in en de; do
    [[ -s $src/train.$lang ]] || zcat "data/debian-doc-en-de/train.$lang.gz" | sed -n 1,20000p >"$src/train.$lang"
    for split in valid test; do
        [[ -s $src/$split.$lang ]] || zcat "data/debian-doc-en-de/$split.$lang.gz" | sed -n 1,100p >"$src/$split.$lang"
    done
done
recipes/prepare_corpus.sh --src-dir "$src" --out "$out/data" --vocab-size 4000 --workers 4
data=$out/data/bin

model=(--encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 256 --decoder-embed-dim 256
    --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024 --encoder-attention-heads 4
    --decoder-attention-heads 4 --encoder-normalize-before --decoder-normalize-before)
common=("$data" --user-dir fairseq_qplugin --share-all-embeddings "${model[@]}" --optimizer adam
    --adam-betas '(0.9,0.98)' --max-tokens 4096 --seed 1 --no-epoch-checkpoints --log-format simple
    --log-interval 10 --num-workers 0)

# 2. the fp32 model
fp32=$out/fp32/checkpoint_last.pt
if [[ ! -f $fp32 ]]; then
    log "fp32: 300 updates"
    fairseq-train "${common[@]}" --arch transformer --lr 0.002 --lr-scheduler inverse_sqrt --warmup-updates 100 \
        --warmup-init-lr 1e-07 --max-update 300 --save-dir "$out/fp32" >"$out/fp32.log" 2>&1 ||
        { tail -n 30 "$out/fp32.log"; log "fp32 training failed (log: $out/fp32.log)"; exit 1; }
fi

declare -A ARCH=(
    [int8]="transformer_int8 --quant-bits 4 --quant-act input"
    [kmeans]="transformer_kmeans --quant-method kmeans --quant-bits 4"
    [bcq-pnr]="transformer_bcq --bcq-bits 3 --optimizer pnr_adam --pnr-period 10"
)

# finite, falling training loss: the train_inner losses of a fairseq log
loss_check() {
    python - "$1" <<'EOF'
import math, re, sys
inner = [l for l in open(sys.argv[1]) if "| train_inner |" in l]
losses = [float(re.search(r" loss=([^,\s]+)", l).group(1)) for l in inner]
ok = len(losses) >= 2 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
speed = " ".join(re.search(rf"{k}=[^,\s]+", inner[-1]).group(0) for k in ("ups", "wps")) if inner else ""
print(("ok" if ok else "FAIL") + " loss " + " ".join(f"{x:.3f}" for x in losses) + f" (last interval: {speed})")
sys.exit(0 if ok else 1)
EOF
}

# the packed checkpoint translates the test sentences as the QAT checkpoint does (on the CPU)
pack_check() {
    local ckpt=$1 dir=$2
    python -m fairseq_qplugin.pack.cli "$ckpt" "$dir/packed.pt" >"$dir/pack.log" 2>&1 || { echo "FAIL pack (log: $dir/pack.log)"; return 1; }
    local c
    for c in qat packed; do
        local path=$ckpt
        [[ $c == qat ]] || path=$dir/packed.pt
        OMP_NUM_THREADS=4 fairseq-generate "$data" --user-dir fairseq_qplugin --path "$path" --gen-subset test \
            --beam 2 --max-len-b 40 --max-tokens 4000 --required-batch-size-multiple 1 --cpu >"$dir/gen_$c.log" 2>&1 || { echo "FAIL generate $c (log: $dir/gen_$c.log)"; return 1; }
    done
    python - "$(wc -l <"$src/test.en")" "$dir/gen_qat.log" "$dir/gen_packed.log" <<'EOF'
import sys
n = int(sys.argv[1])
hyps = [sorted(l.rstrip("\n").split("\t") for l in open(p) if l.startswith("H-")) for p in sys.argv[2:]]
same = len(hyps[0]) == len(hyps[1]) == n and all(
    a[0] == b[0] and a[2] == b[2] and abs(float(a[1]) - float(b[1])) <= 1e-3 for a, b in zip(*hyps))
print(f"{'ok' if same else 'FAIL'} packed = QAT translations ({len(hyps[1])} of {len(hyps[0])} sentences)")
sys.exit(0 if same else 1)
EOF
}

# 3. QAT runs on the GPU; each run's CPU pack check goes on in the background during the next run
failed=0 checks=()
for a in "${archs[@]}"; do
    [[ -n ${ARCH[$a]:-} ]] || { log "unknown arch '$a' (GPU_CHECK_ARCHS: ${!ARCH[*]})"; exit 2; }
    for p in "${precisions[@]}"; do
        case $p in
            amp) prec=(--amp) ;;
            bf16) prec=(--bf16); [[ $a != bcq-pnr ]] || prec+=(--memory-efficient-bf16) ;;
            memory-efficient-fp16) prec=(--memory-efficient-fp16) ;;
            *) log "unknown precision '$p' (amp bf16 memory-efficient-fp16)"; exit 2 ;;
        esac
        name=$a-$p dir=$out/$a-$p
        rm -rf "$dir" && mkdir -p "$dir"
        # shellcheck disable=SC2086  # the arch flags are words
        if ! fairseq-train "${common[@]}" --arch ${ARCH[$a]} "${prec[@]}" --lr 0.0005 --max-update 50 \
            --finetune-from-model "$fp32" --save-dir "$dir" --disable-validation >"$dir/train.log" 2>&1; then
            echo "$name: FAIL training (log: $dir/train.log)"
            failed=1
            continue
        fi
        if result=$(loss_check "$dir/train.log"); then echo "$name: $result"; else echo "$name: $result"; failed=1; fi
        (
            if result=$(pack_check "$dir/checkpoint_last.pt" "$dir"); then rc=0; else rc=1; fi
            echo "$name: $result" >"$dir/pack_check.txt"
            exit $rc
        ) &
        checks+=("$!:$dir")
    done
done
for c in "${checks[@]}"; do
    wait "${c%%:*}" || failed=1
    cat "${c#*:}/pack_check.txt"
done
log "done in $(($(date +%s) - start))s"
exit $failed
