# shellcheck shell=bash
# The demo's model, schedules and BCQ mix, sourced by scripts/demo.sh and scripts/methods.sh (and read
# by benchmarks/bench_train.py).
# A 3+3-layer pre-norm transformer, d=256, 4 heads, shared 8k sentencepiece vocabulary: the size a
# 2-core CPU trains to a usable model in about 10 minutes (FP32_UPDATES updates of 4096 tokens).
model=(--encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 256 --decoder-embed-dim 256
       --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024
       --encoder-attention-heads 4 --decoder-attention-heads 4
       --encoder-normalize-before --decoder-normalize-before --dropout 0.1)
fp32_schedule=(--max-update "${FP32_UPDATES:-500}" --lr 0.002 --warmup 150 --max-tokens 4096)
# Quantization-aware fine-tuning from the fp32 checkpoint: short, at a lower learning rate.
qat_schedule=(--max-update "${QAT_UPDATES:-100}" --lr 0.0005 --warmup 20 --max-tokens 4096 --save-interval 0)
# bcq-mix of scripts/methods.sh, 2.79 average bits: embedding 4/3/2/1 bits by word frequency, the top
# encoder FFN 2 bits, the rest 3 (picked by the validation loss right after quantization, docs/bcq.md)
bcq_mix=(--bcq-embed-bits 4 --bcq-embed-freq-ratio 1 --bcq-bits 3
         --bcq-layer-bits encoder.layers.2.fc1:2,encoder.layers.2.fc2:2)
