"""``fairseq-qpack``: export a checkpoint to a packed file and print its size report.

    fairseq-qpack checkpoint_best.pt packed.pt [--data DATA_BIN]               # QAT checkpoint
    fairseq-qpack fp32.pt packed.pt --method bcq --bits 3 [--include decoder]  # post-training quantization

The source is a checkpoint of ``transformer_int8`` / ``transformer_kmeans`` (or any plugin
architecture whose quantizers return a packable QuantizedWeight), or, with ``--method``, a plain
fp32 ``transformer`` that is quantized on the fly (no retraining). Float parameters of the packed
weights (scales, alphas, codebooks) and the unquantized tensors (biases, norms, float layers) are
stored by default (``auto``) in fp16 where that is lossless and in fp32 otherwise, tensor by
tensor, so fairseq-generate on the packed file gives the fake-quant checkpoint's translations.
``--param-dtype fp16 --other-dtype fp16`` makes smaller files that are not exact: fp16 changes each
value by up to 2^-11 relative, which flips near-ties in beam search (up to 4 of 200 test
sentences of the demo's int4 model). (8-bit int weights: see ``--int8-kernel``.)
"""
import argparse
import enum
import json
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from unittest import mock
from pathlib import Path
from typing import Dict

import torch
from omegaconf import OmegaConf

from ..errors import QuantConfigError
from ..modules import QuantEmbedding, QuantLinear, pattern_selector, quantizable_modules, swap_modules
from ..modules.qmodules import is_schema_key
from ..quant import QuantSpec, check_weight
from .card import file_sha256, read_bleu, write_model_card
from .fileformat import FORMAT, VERSION, dictionary_checksum, header_sha256, tensors_sha256
from ..quant.packed import FLOAT_DTYPES
from .int8 import KERNELS as INT8_KERNELS

logger = logging.getLogger("fairseq_qplugin.pack")
DTYPES = ("auto", *sorted(FLOAT_DTYPES))
PTQ_GRANULARITY = {"int": "channel", "bcq": "channel", "kmeans": "tensor"}
COMPONENTS = ("embeddings", "encoder", "decoder", "other")


def plain(x):
    """``x`` as JSON-able plain data (Namespace/DictConfig -> dict, tuple -> list, Enum -> value)."""
    if OmegaConf.is_config(x):
        x = OmegaConf.to_container(x, resolve=True)
    x = vars(x) if isinstance(x, argparse.Namespace) else x.value if isinstance(x, enum.Enum) else x
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x if x is None or isinstance(x, (bool, int, float, str)) else str(x)


def component(name: str) -> str:
    if "embed_tokens" in name or "output_projection" in name or "embed_positions" in name:
        return "embeddings"
    head = name.split(".", 1)[0]
    return head if head in ("encoder", "decoder") else "other"


@contextmanager
def without_weight_init():
    """Build a model without drawing the random initial weights that its checkpoint then replaces
    (``torch.nn.init``'s in-place initializers do nothing inside)."""
    names = ("uniform_", "normal_", "kaiming_uniform_", "xavier_uniform_", "xavier_normal_", "trunc_normal_")
    with mock.patch.multiple(torch.nn.init, **{n: lambda tensor, *args, **kwargs: tensor for n in names}):
        yield


def post_training_quantize(model, args):
    if any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules()):
        raise QuantConfigError("--method quantizes a plain fp32 transformer; this checkpoint is already "
                               "quantized: leave out --method to pack it as trained")
    spec = QuantSpec(method=args.method, bits=args.bits, scheme=args.scheme,
                     granularity=args.granularity or PTQ_GRANULARITY[args.method])
    names = [n for ns in quantizable_modules(model).values() for n in ns]
    chosen = pattern_selector(names, args.include, args.exclude, ("--include", "--exclude"))
    for n in filter(lambda n: chosen([n]), names):  # before the swap (quantize_model of the API searches later)
        check_weight(model.get_submodule(n).weight, f"{n}.weight")
    swap_modules(model, lambda ns: spec if chosen(ns) else None)


def narrow(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """A float tensor in ``dtype`` ("fp16"/"fp32"), or for "auto" in fp16 if that is lossless, else fp32."""
    if dtype != "auto":
        return t.to(FLOAT_DTYPES[dtype])
    half = t.to(torch.float16)
    return half if torch.equal(half.float(), t.float()) else t.float()


def narrow_params(pw, dtype: str):
    """``pw`` with its float parameters (scales, alphas, codebooks) narrowed by ``narrow``."""
    d = {k: narrow(t, dtype) if t.is_floating_point() else t for k, t in pw.as_dict().items()}
    return type(pw).from_dict(d)


def pack_model(model, param_dtype: str = "auto", other_dtype: str = "auto"):
    """(layout, state dict of packed + other tensors, per-weight stats) for a fake-quant model;
    dtypes as ``narrow`` takes them."""
    state = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()  # nothing quantized here
             if not is_schema_key(k)}
    layout, stats, done = {}, [], {}
    quantized = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
                 if isinstance(m, (QuantLinear, QuantEmbedding))]
    quantized.sort(key=lambda nm: not isinstance(nm[1], QuantEmbedding))  # a tied embedding owns the weight
    todo = len({id(m.weight) for _, m in quantized})
    for name, module in quantized:
        key, w = id(module.weight), module.weight.detach()
        if key not in done:
            check_weight(w, f"{name}.weight")
            start = time.perf_counter()
            try:
                done[key] = (name, narrow_params(module.wq.packed(w), param_dtype))  # saved, or searched
                stats.append((name, w.numel(), done[key][1]))
            except QuantConfigError:  # e.g. pruning only: stays a (sparse) float weight
                done[key] = (name, None)
            logger.info("[%d/%d] %s: %s %s, %.2f s", len(done), todo, name, tuple(w.shape), module.wq.extra_repr(),
                        time.perf_counter() - start)
        owner, pw = done[key]
        if pw is None:
            state[name + ".weight"] = module.wq.state_dict_weight(w)
            continue
        act_in, act_out = getattr(module, "act_in", None), getattr(module, "act_out", None)
        act, act_q = ("input", act_in) if act_in is not None else ("output", act_out) if act_out is not None else \
            ("none", None)
        layout[name] = {"kind": "embedding" if isinstance(module, QuantEmbedding) else "linear",
                        "method": pw.method, "bits": int(pw.bits), "shape": list(pw.shape), "weight": owner,
                        "act": act, "act_bits": act_q.bits if act_q is not None else 8}
        for k in [k for k in state if k == name + ".weight" or k.startswith(name + ".wq.")]:
            del state[k]
        for field, t in pw.as_dict().items():
            state[f"{name}.wq.{field}"] = t
    packed_keys = {k for k in state if any(k.startswith(n + ".wq.") for n in layout)}
    for k, t in state.items():
        if k not in packed_keys and t.is_floating_point() and t.dim() > 0:
            state[k] = narrow(t, other_dtype)
    return layout, state, stats


def size_report(model_state, layout, fp32_params: Dict[str, int], file_bytes: int) -> dict:
    """Bytes per component (unique storages), average bits of the packed weights, compression."""
    rows = {c: {"bytes": 0, "fp32_bytes": 0, "qparams": 0, "qbits": 0} for c in COMPONENTS}
    storages = {t.untyped_storage().data_ptr(): (k, t.untyped_storage().nbytes())  # reversed: the first key wins
                for k, t in reversed(model_state.items())}
    for k, nbytes in storages.values():
        rows[component(k)]["bytes"] += nbytes
    for name, e in layout.items():
        if e["weight"] == name:
            c = rows[component(name)]
            rows_, cols = e["shape"]
            c["qparams"] += rows_ * cols
            c["qbits"] += 8 * sum(t.untyped_storage().nbytes() for k, t in model_state.items() if k.startswith(name + ".wq."))
    for name, n in fp32_params.items():
        rows[component(name)]["fp32_bytes"] += 4 * n
    total = {f: sum(r[f] for r in rows.values()) for f in ("bytes", "fp32_bytes", "qparams", "qbits")}
    return {"components": rows, "tensor_bytes": total["bytes"], "file_bytes": file_bytes,
            "fp32_bytes": total["fp32_bytes"], "avg_bits": total["qbits"] / max(total["qparams"], 1),
            "compression": total["fp32_bytes"] / max(file_bytes, 1)}


def format_report(r: dict) -> str:
    lines = ["| component | packed bytes | fp32 bytes | avg bits (packed weights) |", "|---|---:|---:|---:|"]
    for name, c in r["components"].items():
        bits = f"{c['qbits'] / c['qparams']:.2f}" if c["qparams"] else "-"
        lines.append(f"| {name} | {c['bytes']:,} | {c['fp32_bytes']:,} | {bits} |")
    lines += [f"| **total** | {r['tensor_bytes']:,} | {r['fp32_bytes']:,} | {r['avg_bits']:.2f} |", "",
              f"file size {r['file_bytes']:,} bytes ({r['file_bytes'] / max(r['tensor_bytes'], 1):.3f} x the "
              f"packed tensors); compression vs fp32 weights {r['compression']:.2f}x"]
    return "\n".join(lines)


def check_paths(args):
    """Fail before any work if the input is missing, the output cannot be written or would replace the input."""
    if not os.path.isfile(args.checkpoint):
        raise QuantConfigError(f"{args.checkpoint}: no such checkpoint file")
    for flag, path in (("output", args.output), ("--report", args.report)):
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise QuantConfigError(f"{flag} {path}: the directory {folder} does not exist; create it first")
        if os.path.isdir(path):
            raise QuantConfigError(f"{flag} {path} is a directory; give a file name")
        if os.path.exists(path) and os.path.samefile(path, args.checkpoint):
            raise QuantConfigError(f"{flag} {path} is the input checkpoint {args.checkpoint}: writing it would "
                                   "replace the checkpoint; give another output file")


def atomic_write(path: str, write):
    """``write(tmp)`` to a temporary file next to ``path``, then rename it to ``path``: an interrupted
    write leaves ``path`` as it was (never a partial file)."""
    folder, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would create it (mkstemp makes it private)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def export(args):
    """Pack ``args.checkpoint`` into ``args.output``: (size report, the packed file's header)."""
    from fairseq import checkpoint_utils

    check_paths(args)
    overrides = {"data": args.data} if args.data else None
    with without_weight_init():
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([args.checkpoint], arg_overrides=overrides)
    model = models[0].eval()
    fp32_params = {n: p.numel() for n, p in model.named_parameters()}  # unique parameters
    if args.method:
        post_training_quantize(model, args)
    elif not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules()):
        raise QuantConfigError(f"{args.checkpoint} is a plain fp32 model: give --method int|bcq|kmeans and "
                               "--bits N to quantize it after training")
    layout, state, stats = pack_model(model, args.param_dtype, args.other_dtype)
    cfg_plain = plain(cfg)
    model_args = cfg_plain["model"]
    source_arch = model_args.get("arch") or model_args.get("_name")
    model_args.update({"_name": "transformer_packed", "arch": "transformer_packed", "qpack_layout": json.dumps(layout),
                       "qpack_dictionary": dictionary_checksum(task.source_dictionary, task.target_dictionary),
                       "int8_kernel": args.int8_kernel})
    header = {"format": FORMAT, "version": VERSION, "layout": layout, "sha256": tensors_sha256(state),
              "config": cfg_plain, "source": {"checkpoint": os.path.basename(args.checkpoint), "arch": source_arch,
                         "ptq": plain(vars(args)) if args.method else None,
                         "param_dtype": args.param_dtype, "other_dtype": args.other_dtype}}
    header["header_sha256"] = header_sha256(header)
    packed = {"cfg": cfg_plain, "model": state, "qpack": header, "extra_state": {},
              "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "none",
                                     "lr_scheduler_state": {}, "num_updates": 0}]}
    atomic_write(args.output, lambda tmp: torch.save(packed, tmp))
    report = size_report(state, layout, fp32_params, os.path.getsize(args.output))
    logger.info("packed %d weights (%d modules) into %s", len(stats), len(layout), args.output)
    return report, header


def get_parser():
    p = argparse.ArgumentParser(prog="fairseq-qpack", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="fairseq checkpoint (quantization-aware, or plain fp32 with --method)")
    p.add_argument("output", nargs="?", help="packed checkpoint to write (not with --export-ctranslate2)")
    p.add_argument("--export-ctranslate2", metavar="DIR",
                   help="instead of packing: write a CTranslate2 model directory from a symmetric 8-bit int "
                        "checkpoint (transformer_int8 --quant-bits 8), its int8 codes unchanged")
    p.add_argument("--data", help="data-bin directory with the dictionaries, if not where the checkpoint says")
    p.add_argument("--method", choices=["int", "bcq", "kmeans"], help="post-training quantization of an fp32 checkpoint")
    p.add_argument("--bits", type=int, default=4, help="bits per weight for --method (int 1-8, bcq 1-4, kmeans 1-8)")
    p.add_argument("--scheme", choices=["sym", "asym"], default="sym", help="--method int: range scheme")
    p.add_argument("--granularity", choices=["channel", "tensor"],
                   help="--method: parameters per row or per tensor (default: channel; tensor for kmeans)")
    p.add_argument("--include", default="all", help="--method: parts or module globs to quantize")
    p.add_argument("--exclude", default="", help="--method: parts or module globs to leave in float")
    p.add_argument("--param-dtype", choices=DTYPES, default="auto",
                   help="dtype of scales, alphas and codebooks (auto: fp16 where lossless, else fp32: "
                        "bit-exact with the source checkpoint; fp16: smaller, not exact)")
    p.add_argument("--other-dtype", choices=DTYPES, default="auto",
                   help="dtype of the tensors that are not quantized (biases, norms, float layers); as --param-dtype")
    p.add_argument("--int8-kernel", choices=INT8_KERNELS, default="fbgemm",
                   help="8-bit int weights: fbgemm = int8 GEMM with dynamic activation quantization (fast, "
                        "translations may differ slightly), dequant = exact dequantize + fp32 BLAS; "
                        "fairseq-generate --model-overrides \"{'int8_kernel': 'dequant'}\" changes it later")
    p.add_argument("--report", help="also write the size report (markdown) to this file")
    p.add_argument("--bleu-json", metavar="FILE", help="BLEU of the packed model for its model card "
                   "(OUTPUT.card.json/.md): the output of sacrebleu REF -i HYP -m bleu -f json")
    return p


def main(argv=None) -> int:
    """The console script: exit status 0 on success; a bad flag or file exits 1 with one ``error:`` line."""
    from ..commands import start_command  # (the package import registers the architectures)

    start_command()
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--export" in argv:  # fairseq-qpack --export DIR PACKED.pt: the torch-free runtime's directory
        from ..runtime.export import main as export_main
        return export_main(argv)
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.export_ctranslate2:
        from .ctranslate2 import main_export
        main_export(args)
        return 0
    if not args.output:
        parser.error("give the packed checkpoint to write (OUTPUT), or --export-ctranslate2 DIR")
    bleu = read_bleu(args.bleu_json) if args.bleu_json else None  # checked before the work
    with ThreadPoolExecutor(1) as pool:  # the card's checksum of the checkpoint, hashed while it is packed
        source_sha256 = pool.submit(file_sha256, args.checkpoint)
        report, header = export(args)
    write_model_card(args.output, header, source_sha256.result(), report, bleu)
    text = format_report(report)
    print(text)
    if args.report:
        atomic_write(args.report, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
