"""fairseq-qpack on a QAT checkpoint: packing the saved codes vs the search of the 0.2 release; one table.

    python benchmarks/bench_pack.py                        # transformer_bcq 6+6 d512, 3 bits, 8000 words
    python benchmarks/bench_pack.py --vocab 32000 --flags "--bcq-bits 2 --bcq-search greedy"

Builds a ``transformer_bcq`` model of fairseq's base size (6+6 layers, d512, ffn 2048, shared
embeddings) on a dictionary of ``--vocab`` words, saves it as a fairseq checkpoint (the codes, as
training saves them) and as the same checkpoint without the code and latent entries (what the 0.2
release saved), then runs ``fairseq-qpack`` (``pack.cli.main``, in this process) on each, in turn,
``--rounds`` times. Columns: best wall-clock seconds of the whole command (load, pack, write) and of
its packing step (``pack_model``: codes to packed tensors, the part the saved codes replace), the
number of code searches it ran, and whether the packed tensors equal those of the search path.
"""
import argparse
import logging
import os
import tempfile
import time

import torch
from fairseq import options, tasks
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from omegaconf import OmegaConf

import fairseq_qplugin  # noqa: F401  (architectures)
import fairseq_qplugin.modules.qmodules as qmodules
from fairseq_qplugin.modules.qmodules import is_schema_key
import fairseq_qplugin.pack.cli as cli


def write_checkpoints(folder, vocab, flags):
    d = Dictionary()
    for i in range(vocab - 4):
        d.add_symbol(f"w{i}", n=vocab - i)
    for lang in ("en", "de"):
        d.save(os.path.join(folder, f"dict.{lang}.txt"))
    argv = [folder, "--arch", "transformer_bcq", "--source-lang", "en", "--target-lang", "de",
            "--share-all-embeddings", *flags.split()]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    cfg = convert_namespace_to_omegaconf(args)
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    start = time.perf_counter()
    state = model.eval().state_dict()
    print(f"saving the QAT checkpoint (one search, as training's last save does): {time.perf_counter() - start:.1f} s")
    history = {"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam", "lr_scheduler_state": {},
               "num_updates": 0}
    base = {"cfg": OmegaConf.to_container(cfg, resolve=True), "extra_state": {}, "optimizer_history": [history]}
    paths = {}
    for name, keep in (("codes", lambda k: True), ("search", lambda k: not is_schema_key(k))):
        paths[name] = os.path.join(folder, f"{name}.pt")
        torch.save({**base, "model": {k: v for k, v in state.items() if keep(k)}}, paths[name])
    return paths, sum(p.numel() for p in model.parameters())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--flags", default="--bcq-bits 3", help="transformer_bcq flags")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    logging.disable(logging.INFO)
    searches, packing = [], []
    for name in ("quantize", "quantize_bcq_rows"):
        original = getattr(qmodules, name)
        setattr(qmodules, name, lambda *a, _f=original, **k: searches.append(1) or _f(*a, **k))
    pack_model = cli.pack_model

    def timed_pack_model(*a, **k):
        start = time.perf_counter()
        out = pack_model(*a, **k)
        packing.append(time.perf_counter() - start)
        return out

    cli.pack_model = timed_pack_model
    with tempfile.TemporaryDirectory() as folder:
        paths, params = write_checkpoints(folder, args.vocab, args.flags)
        best, step, count, packed = {}, {}, {}, {}
        for _ in range(args.rounds):
            for name, path in paths.items():
                out = os.path.join(folder, f"packed_{name}.pt")
                searches.clear()
                start = time.perf_counter()
                cli.main([path, out, "--data", folder])
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
                step[name] = min(step.get(name, float("inf")), packing[-1])
                count[name] = len(searches)
                packed[name] = torch.load(out, weights_only=True)["model"]
    same = sorted(packed["codes"]) == sorted(packed["search"]) and all(
        torch.equal(packed["codes"][k], packed["search"][k]) for k in packed["codes"])
    print(f"\ntransformer_bcq 6+6 d512, {args.vocab} words, {params / 1e6:.1f}M parameters, flags {args.flags!r}, "
          f"torch threads {torch.get_num_threads()}\n")
    print(f"| fairseq-qpack input | whole command, s | packing step, s | searches | packed tensors |")
    print("|---|---:|---:|---:|---|")
    print(f"| checkpoint with codes | {best['codes']:.2f} | {step['codes']:.2f} | {count['codes']} | "
          f"{'identical' if same else 'DIFFER'} |")
    print(f"| 0.2 checkpoint (search) | {best['search']:.2f} | {step['search']:.2f} | {count['search']} | reference |")
    print(f"\nspeed-up (best of {args.rounds}): packing step {step['search'] / step['codes']:.1f}x, "
          f"whole command {best['search'] / best['codes']:.1f}x")


if __name__ == "__main__":
    main()
