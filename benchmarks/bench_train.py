"""Training-step cost of quantization-aware fine-tuning: ms per forward + backward of one batch,
for the fp32 transformer, BCQ under pNR (full-precision forward) and BCQ trained straight-through
(every step quantizes every weight); prints one markdown table.

    python benchmarks/bench_train.py --data exp/demo/data/bin            # the demo's model, 1 thread
    python benchmarks/bench_train.py --data exp/demo/data/bin --threads 2 --cpu-time

The model is the demo's (scripts/demo_model.sh: 3+3 layers, d=256, shared embeddings) built on the
dictionary of ``--data``; the batch is ``--sentences`` random sentences of ``--length`` tokens (the
demo trains on batches of 4096 tokens). Rows take turns within every round and each cell is the best
of ``--rounds``, so load changes hit all rows alike. "quantize" is the time of quantizing every
weight once (what straight-through training adds per step); the "every use" row is the same
straight-through model with the tied embedding quantized at each of its three uses (encoder and
decoder lookup, output projection) instead of once per forward (``quantize_once_per_forward``).
The last two rows train the same straight-through model with a real criterion instead of the proxy loss
(log-sum-exp of the logits): label_smoothed_cross_entropy, then label_smoothed_cross_entropy_distill with
an fp32 teacher of the first row's size (its forward without gradients plus the KL term is the cost of
distillation; the difference between the two rows).
"""
import argparse
import logging
import subprocess
import time
import warnings
from pathlib import Path

import torch
from fairseq import options, tasks
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models.transformer import TransformerModel

import bench_layers
import fairseq_qplugin
from fairseq_qplugin.criterions.distill import DistillCriterion
from fairseq_qplugin.modules import WeightQuantizer

DEMO_MODEL_SH = Path(__file__).resolve().parent.parent / "scripts" / "demo_model.sh"


def demo_flags(array):
    """A bash array of scripts/demo_model.sh, word for word as the shell scripts pass it."""
    script = f'source "$0" && printf "%s\\0" "${{{array}[@]}}"'
    out = subprocess.run(["bash", "-c", script, str(DEMO_MODEL_SH)], check=True, capture_output=True, text=True)
    return out.stdout.split("\0")[:-1]


MODEL = demo_flags("model") + ["--share-all-embeddings"]  # recipes/train.sh adds --share-all-embeddings
MIX = demo_flags("bcq_mix")
ROWS = [  # name, arch, flags, straight-through (else pNR: full-precision forward)
    ("fp32 transformer", "transformer", [], False),
    ("bcq 3-bit, pNR", "transformer_bcq", ["--bcq-bits", "3"], False),
    ("bcq 3-bit, straight-through", "transformer_bcq", ["--bcq-bits", "3", "--bcq-rounds", "2"], True),
    ("bcq-mix 2.79 bits, straight-through", "transformer_bcq", MIX + ["--bcq-rounds", "2"], True),
]
CRITERION_ROWS = [  # name, distillation weight alpha (None: plain label_smoothed_cross_entropy)
    ("bcq 3-bit, straight-through, label-smoothed CE", None),
    ("bcq 3-bit, straight-through, distill from fp32 (alpha 0.5, T 1)", 0.5),
]


def build(data, arch, flags, ste):
    argv = [data, "--user-dir", fairseq_qplugin.__path__[0], "--task", "translation", "--arch", arch, *MODEL, *flags]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    for m in model.modules():
        if isinstance(m, WeightQuantizer):
            m.pnr = not ste  # as the pNR optimizer sets it
    return model.train(), task


def step_fn(model, forward, batch):
    def step():
        model.zero_grad(set_to_none=True)
        out = forward(*batch)[0]
        out.float().logsumexp(-1).mean().backward()
    return step


def criterion_step_fn(model, criterion, sample):
    def step():
        model.zero_grad(set_to_none=True)
        criterion(model, sample)[0].backward()
    return step


def criterion_steps(data, sample):
    """One step per CRITERION_ROWS on a fresh bcq 3-bit straight-through model (label smoothing 0.1)."""
    arch, flags = ROWS[2][1], ROWS[2][2]
    model, task = build(data, arch, flags, True)
    teacher, _ = build(data, ROWS[0][1], ROWS[0][2], False)
    steps = []
    for _, alpha in CRITERION_ROWS:
        if alpha is None:
            criterion = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)
        else:
            criterion = DistillCriterion(task, False, 0.1, distill_alpha=alpha, teacher=teacher)
        steps.append(criterion_step_fn(model, criterion, sample))
    return steps


def quantize_all_fn(model):
    """Quantize every weight once (a tied weight once)."""
    quantized = [m for m in model.modules() if isinstance(getattr(m, "wq", None), WeightQuantizer)]
    quantizers = {id(m.wq): (m.wq, m.weight) for m in quantized}
    return lambda: [wq.quantized(w) for wq, w in quantizers.values()]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a fairseq-preprocess'ed directory (its dict.*.txt are used)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sentences", type=int, default=128)
    p.add_argument("--length", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cpu-time", action="store_true", help="time with process CPU time (on a loaded machine)")
    args = p.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names, steps, quantize = [], [], []
    for name, arch, flags, ste in ROWS:
        model, task = build(args.data, arch, flags, ste)
        vocab = len(task.source_dictionary)
        tokens = torch.randint(4, vocab, (args.sentences, args.length))
        batch = (tokens, torch.full((args.sentences,), args.length), tokens)
        names.append(name)
        steps.append(step_fn(model, model, batch))
        quantize.append(quantize_all_fn(model) if ste else None)
        if ste and name.startswith("bcq 3-bit"):
            names.append(name + ", every use")
            steps.append(step_fn(model, lambda *b, m=model: TransformerModel.forward(m, *b), batch))
            quantize.append(None)
    sample = {"net_input": {"src_tokens": tokens, "src_lengths": batch[1], "prev_output_tokens": tokens},
              "target": tokens, "ntokens": tokens.numel()}
    names += [name for name, _ in CRITERION_ROWS]
    steps += criterion_steps(args.data, sample)
    quantize += [None] * len(CRITERION_ROWS)
    if args.cpu_time:
        bench_layers.CLOCK = time.process_time  # the clock of bench_layers.race
    step_ms = bench_layers.race(steps, args.rounds)
    q_ms = bench_layers.race([q for q in quantize if q], args.rounds)
    q_iter = iter(q_ms)
    print(f"training step (forward + backward), {args.sentences} x {args.length} tokens, {args.threads} thread(s), "
          f"best of {args.rounds}, {'CPU' if args.cpu_time else 'wall'} time\n")
    print("| model | ms per step | x fp32 | quantize all weights (ms) |")
    print("|---|---:|---:|---:|")
    for name, ms, q in zip(names, step_ms, quantize):
        print(f"| {name} | {ms:.0f} | {ms / step_ms[0]:.2f} | {f'{next(q_iter):.0f}' if q else ''} |")


if __name__ == "__main__":
    main()
