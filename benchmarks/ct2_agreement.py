"""CTranslate2 against fairseq on an 8-bit QAT checkpoint exported with --export-ctranslate2: BLEU, the
sentences translated identically, and where CTranslate2 int8's translations come from.

    fairseq-qpack --export-ctranslate2 ct2 qat8/checkpoint_last.pt
    python benchmarks/ct2_agreement.py --checkpoint qat8/checkpoint_last.pt --ct2 ct2 --data BIN --ref test.de

Rows (beam 5, length penalty 1, at most 200 tokens, as fairseq-generate's defaults; the source is the
binarized split, so every engine reads the same pieces; sacrebleu on sentencepiece-decoded output):
fairseq (its SequenceGenerator on the checkpoint), fairseq with CTranslate2's int8 activation rounding
simulated (the input of every quantized linear layer rounded per row to max|x_row| / 127 steps, as
CTranslate2's int8 GEMM quantizes it; ``--no-simulated`` skips it), CTranslate2 ``float32`` and
``int8``. Each row gives the sentences identical to fairseq's and to CTranslate2 int8's, and the
paired-bootstrap 95% interval of its BLEU difference to fairseq (1,000 resamples).
"""
import argparse
import json

import numpy as np
import sacrebleu
import torch

import fairseq_qplugin  # noqa: F401 (registers the architectures)
from fairseq import checkpoint_utils
from fairseq_qplugin.modules import QuantLinear
from fairseq_qplugin.scoring import read_lines


def detok(pieces):
    return "".join(pieces).replace("\u2581", " ").strip()


def fairseq_translate(model, task, cfg, dataset, act_int8=False):
    hooks = []
    if act_int8:
        def rounded(module, inputs):
            s = 127.0 / inputs[0].abs().amax(-1, keepdim=True).clamp_min(1e-12)
            return (torch.round(inputs[0] * s) / s,)
        hooks = [m.register_forward_pre_hook(rounded) for m in model.modules() if isinstance(m, QuantLinear)]
    gen = task.build_generator([model], cfg.generation)
    batches = task.get_batch_iterator(dataset, max_sentences=64, required_batch_size_multiple=1)
    out = {}
    with torch.no_grad():
        for sample in batches.next_epoch_itr(shuffle=False):
            for i, hyp in zip(sample["id"].tolist(), task.inference_step(gen, [model], sample)):
                out[i] = detok(task.target_dictionary.string(hyp[0]["tokens"]).split())
    for h in hooks:
        h.remove()
    return [out[i] for i in range(len(dataset))]


def ct2_translate(path, sources, compute_type):
    import ctranslate2

    translator = ctranslate2.Translator(path, device="cpu", compute_type=compute_type, intra_threads=1)
    results = translator.translate_batch(sources, beam_size=5, max_decoding_length=200, max_batch_size=64)
    return [detok(r.hypotheses[0]) for r in results]


def bootstrap(base, hyps, refs, n=1000, seed=0):
    """95% interval of BLEU(hyps) - BLEU(base) over paired resamples of the sentences."""
    metric = sacrebleu.metrics.BLEU()
    sa = np.array(metric._extract_corpus_statistics(base, [refs]))
    sb = np.array(metric._extract_corpus_statistics(hyps, [refs]))
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        idx = rng.integers(0, len(base), len(base))
        diffs.append(metric._compute_score_from_stats(sb[idx].sum(0).tolist()).score
                     - metric._compute_score_from_stats(sa[idx].sum(0).tolist()).score)
    return np.percentile(diffs, 2.5), np.percentile(diffs, 97.5)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="the transformer_int8 --quant-bits 8 checkpoint")
    ap.add_argument("--ct2", required=True, help="its --export-ctranslate2 directory")
    ap.add_argument("--data", required=True, help="fairseq binary data with the split")
    ap.add_argument("--ref", required=True, help="raw reference of the split")
    ap.add_argument("--subset", default="test")
    ap.add_argument("--no-simulated", action="store_true", help="skip the simulated int8 activation row")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([args.checkpoint],
                                                                       arg_overrides={"data": args.data})
    model = models[0].eval()
    task.load_dataset(args.subset)
    dataset = task.dataset(args.subset)
    sources = [[task.source_dictionary[t] for t in dataset.src[k][:-1].tolist()] for k in range(len(dataset))]
    refs = read_lines(args.ref)
    assert len(refs) == len(sources), (len(refs), len(sources))

    runs = {"fairseq": fairseq_translate(model, task, cfg, dataset)}
    if not args.no_simulated:
        runs["fairseq, int8 activations simulated"] = fairseq_translate(model, task, cfg, dataset, act_int8=True)
    runs["CTranslate2 float32"] = ct2_translate(args.ct2, sources, "float32")
    runs["CTranslate2 int8"] = ct2_translate(args.ct2, sources, "int8")

    base, int8 = runs["fairseq"], runs["CTranslate2 int8"]
    metric = sacrebleu.metrics.BLEU()
    rows = {}
    print(f"{len(base)} sentences, beam 5; sacrebleu {metric.corpus_score(base, [refs]) and metric.get_signature()}\n")
    print("| engine | BLEU | Δ vs fairseq (95% bootstrap) | identical to fairseq | identical to CTranslate2 int8 |")
    print("|---|---:|---|---:|---:|")
    for name, hyps in runs.items():
        score = sacrebleu.corpus_bleu(hyps, [refs]).score
        lo, hi = bootstrap(base, hyps, refs) if hyps is not base else (0.0, 0.0)
        rows[name] = {"bleu": score, "ci95": [lo, hi], "same_as_fairseq": sum(a == b for a, b in zip(hyps, base)),
                      "same_as_ct2_int8": sum(a == b for a, b in zip(hyps, int8))}
        delta = "" if hyps is base else f"{score - rows['fairseq']['bleu']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
        print(f"| {name} | {score:.2f} | {delta} | {rows[name]['same_as_fairseq']} | {rows[name]['same_as_ct2_int8']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
