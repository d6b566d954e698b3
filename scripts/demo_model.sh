# shellcheck shell=bash
# The demo's model and schedules, sourced by scripts/demo.sh and scripts/methods.sh.
# A 3+3-layer pre-norm transformer, d=256, 4 heads, shared 8k sentencepiece vocabulary: the size a
# 2-core CPU trains to a usable model in about 10 minutes (FP32_UPDATES updates of 4096 tokens).
model=(--encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 256 --decoder-embed-dim 256
       --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024
       --encoder-attention-heads 4 --decoder-attention-heads 4
       --encoder-normalize-before --decoder-normalize-before --dropout 0.1)
fp32_schedule=(--max-update "${FP32_UPDATES:-500}" --lr 0.002 --warmup 150 --max-tokens 4096)
# Quantization-aware fine-tuning from the fp32 checkpoint: short, at a lower learning rate.
qat_schedule=(--max-update "${QAT_UPDATES:-100}" --lr 0.0005 --warmup 20 --max-tokens 4096 --save-interval 0)
