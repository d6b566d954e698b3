"""Post-training quantization of an fp32 checkpoint into any quantized architecture and its flags: the
validation loss right after quantization (no training), and optionally a checkpoint to translate.

    python scripts/ptq_mix.py FP32.pt DATA_BIN --model-flags '--encoder-layers 3 ...' \\
        bcq3='transformer_bcq --bcq-bits 3' alloc="transformer_bcq $(cat alloc.flags)" [--save-dir DIR]

Each NAME='ARCH FLAGS' builds ARCH with the model flags and FLAGS (as fairseq-train would), loads the fp32
weights into it and prints NAME, the validation nll in bits per token (fairseq's ``nll_loss``, on the first
``--max-sentences`` sentences of ``--valid-subset``) and FLAGS. With ``--save-dir``, DIR/NAME.pt is that
model as a checkpoint (its fp32 weights, quantized when loaded) for fairseq-generate.
"""
import argparse
import logging
import shlex
import sys
from pathlib import Path

import torch
from fairseq import checkpoint_utils, options, tasks

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fairseq_qplugin  # noqa: E402,F401  (architectures, checkpoint allow-list)
from fairseq_qplugin.allocate import validation_batches, validation_loss  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="the fp32 checkpoint")
    p.add_argument("data", help="its binarized data directory")
    p.add_argument("mixes", nargs="+", metavar="NAME='ARCH FLAGS'")
    p.add_argument("--model-flags", default="", help="the architecture flags of the fp32 model (layers, dims, ...)")
    p.add_argument("--valid-subset", default="valid")
    p.add_argument("--max-sentences", type=int, default=1000)
    p.add_argument("--save-dir", type=Path, help="also save DIR/NAME.pt for fairseq-generate")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    state = checkpoint_utils.load_checkpoint_to_cpu(args.checkpoint)
    batches = None
    for mix in args.mixes:
        name, _, flags = mix.partition("=")
        arch, *rest = shlex.split(flags)
        margs = options.parse_args_and_arch(options.get_training_parser(), [
            args.data, "--user-dir", str(ROOT / "fairseq_qplugin"), "--task", "translation", "--arch", arch,
            "--optimizer", "adam", "--share-all-embeddings", *shlex.split(args.model_flags), *rest])
        task = tasks.setup_task(margs)
        model = task.build_model(margs)
        model.load_state_dict(state["model"], strict=True)
        model.eval()
        if args.save_dir:
            args.save_dir.mkdir(parents=True, exist_ok=True)
            torch.save(dict(state, cfg=dict(state["cfg"], model=margs)), args.save_dir / f"{name}.pt")
        if batches is None:
            batches = validation_batches(task, args.valid_subset, args.max_sentences, 4096)
        print(f"{name}\t{validation_loss(model, batches, task.target_dictionary.pad()):.4f}\t{flags}", flush=True)


if __name__ == "__main__":
    main()
