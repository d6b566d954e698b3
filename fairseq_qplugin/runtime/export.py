"""``fairseq-qpack --export DIR PACKED.pt``: a packed checkpoint as a torch-free model directory.

The directory is what the runtime (``fairseq_qruntime``, ``fairseq-qtranslate``) reads without torch
or fairseq::

    DIR/model.safetensors   every tensor the engine reads, in the packed file's dtypes (fp16 / fp32 /
                            uint8); a tensor shared by tied modules is stored once, under its owner
    DIR/config.json         format + version, the architecture (dims, layers, heads, pre/post-norm,
                            activation, positions, embedding scale, tied embeddings, attention
                            scaling with the temperature folded in), special symbols, every linear /
                            embedding module with its format, bits, shape, owner and tensors (dtype,
                            shape), activation quantization ranges, the sha256 of the tensors
    DIR/dict.<src>.txt, DIR/dict.<tgt>.txt   the fairseq dictionaries (checksum in config.json)

Module formats: ``dense`` (a float matrix ``<owner>.weight``) or a packed one of quant/packed.py
(``int``, ``bcq``, ``bcq_mixed``, ``kmeans``) whose fields are ``<owner>.wq.<field>``, laid out
as documented there. See docs/runtime.md.
"""
import json
import math
import os

import torch
from fairseq_qruntime.model import ACTIVATIONS, FORMAT, VERSION, tensors_sha256  # torch-free: the reader's rules

from ..errors import QuantConfigError
from ..pack.fileformat import dictionary_checksum, layout_of, load_packed
from ..quant.linear import asym_params

SKIPPED_SUFFIXES = (".version", "_float_tensor", ".running_min", ".running_max", ".initialized")


def module_names(enc_layers: int, dec_layers: int):
    """(name, kind) of every linear / embedding module of fairseq's transformer."""
    out = [("encoder.embed_tokens", "embedding"), ("decoder.embed_tokens", "embedding"),
           ("decoder.output_projection", "linear")]
    sides = (("encoder", enc_layers, ("self_attn",)), ("decoder", dec_layers, ("self_attn", "encoder_attn")))
    for side, n, attns in sides:
        for i in range(n):
            for a in attns:
                out += [(f"{side}.layers.{i}.{a}.{p}", "linear") for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
            out += [(f"{side}.layers.{i}.fc1", "linear"), (f"{side}.layers.{i}.fc2", "linear")]
    return out


def _side(a: dict, side: str, state: dict) -> dict:
    dim, heads = int(a[f"{side}_embed_dim"]), int(a[f"{side}_attention_heads"])
    tau = float(a.get("attn_temperature") or 1.0)
    positions = not a.get("no_token_positional_embeddings", False)
    return {
        "layers": int(a[f"{side}_layers"]), "dim": dim, "ffn": int(a[f"{side}_ffn_embed_dim"]), "heads": heads,
        "normalize_before": bool(a.get(f"{side}_normalize_before", False)),
        "positions": positions, "learned_pos": bool(a.get(f"{side}_learned_pos", False)),
        "max_positions": int(a["max_source_positions" if side == "encoder" else "max_target_positions"]),
        "embed_scale": 1.0 if a.get("no_scale_embedding", False) else math.sqrt(dim),
        "attn_scaling": (dim // heads) ** -0.5 / tau,
        "layernorm_embedding": f"{side}.layernorm_embedding.weight" in state,
    }


def check_supported(a: dict):
    dim = int(a["decoder_embed_dim"])
    unsupported = {
        "adaptive_softmax_cutoff": bool(a.get("adaptive_softmax_cutoff")),
        "cross_self_attention": bool(a.get("cross_self_attention")),
        "no_cross_attention": bool(a.get("no_cross_attention")),
        "decoder_output_dim != decoder_embed_dim": int(a.get("decoder_output_dim") or dim) != dim,
        "decoder_input_dim != decoder_embed_dim": int(a.get("decoder_input_dim") or dim) != dim,
        "encoder_embed_dim != decoder_embed_dim": int(a["encoder_embed_dim"]) != int(a["decoder_embed_dim"]),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise QuantConfigError(f"the runtime does not support this model ({', '.join(bad)}); use fairseq-generate")
    if a.get("activation_fn", "relu") not in ACTIVATIONS:
        raise QuantConfigError(f"the runtime does not support activation {a.get('activation_fn')!r}; "
                               f"supported: {sorted(ACTIVATIONS)}")


def load_dictionaries(cfg: dict, data):
    from fairseq.data import Dictionary

    task = cfg.get("task") or {}
    data = data or task.get("data")
    if not data:
        raise QuantConfigError("the packed file names no data directory; give --data DATA_BIN")
    data = str(data).split(os.pathsep)[0]
    src, tgt = task.get("source_lang"), task.get("target_lang")
    if not src or not tgt:
        from fairseq.data.data_utils import infer_language_pair

        src, tgt = infer_language_pair(data)
    if not src or not tgt:
        raise QuantConfigError(f"{data}: cannot tell the languages (no train.SRC-TGT.* files); give --data DATA_BIN")
    paths = [os.path.join(data, f"dict.{lang}.txt") for lang in (src, tgt)]
    for p in paths:
        if not os.path.isfile(p):
            raise QuantConfigError(f"{p}: no such dictionary; give --data DATA_BIN (the model's binarized data)")
    return src, tgt, paths, [Dictionary.load(p) for p in paths]


def export_dir(packed_path: str, out_dir: str, data=None) -> dict:
    """Write the runtime directory for a packed checkpoint; returns the config written."""
    state = load_packed(packed_path)
    cfg, model = state["cfg"], state["model"]
    a = cfg["model"]
    check_supported(a)
    layout = layout_of(state)
    src, tgt, dict_paths, dicts = load_dictionaries(cfg, data)
    checksum = dictionary_checksum(*dicts)
    expected = a.get("qpack_dictionary")
    if expected and expected != checksum:
        raise QuantConfigError(f"{dict_paths[0]}: these dictionaries (checksum {checksum}) are not the ones the model "
                               f"was packed with ({expected}); give --data the model's binarized data")
    enc, dec = _side(a, "encoder", model), _side(a, "decoder", model)
    enc["vocab"], dec["vocab"] = len(dicts[0]), len(dicts[1])
    sd = dicts[1]

    # Stored tensors: one name per storage (tied modules share it).
    by_storage, tensors = {}, {}
    for name in sorted(model, key=lambda n: (not n.startswith("encoder.embed_tokens"), n)):
        t = model[name]
        if name.endswith(SKIPPED_SUFFIXES) or t.dim() == 0:
            continue
        if t.dtype not in (torch.float16, torch.float32, torch.uint8):
            raise QuantConfigError(f"{packed_path}: tensor {name} has dtype {t.dtype}; "
                                   "the runtime reads fp16/fp32/uint8")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in by_storage:
            continue
        by_storage[key] = name
        tensors[name] = t.detach().contiguous().numpy()

    def owner_of(name: str) -> str:
        t = model[name]
        return by_storage[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)]

    modules = {}
    for name, kind in module_names(enc["layers"], dec["layers"]):
        e = layout.get(name)
        if e is not None:
            owner = e["weight"]
            fields = sorted(k[len(owner) + 4:] for k in tensors if k.startswith(owner + ".wq."))
            entry = {"kind": kind, "format": e["method"], "bits": int(e["bits"]), "shape": list(e["shape"]),
                     "weight": owner, "tensors": {f: f"{owner}.wq.{f}" for f in fields}}
            act = e.get("act", "none")
            if act != "none":
                entry.update(_act_range(model, name, act, int(e.get("act_bits", 8))))
        else:
            if f"{name}.weight" not in model:
                raise QuantConfigError(f"{packed_path}: module {name} has neither packed nor float weights")
            w = model[f"{name}.weight"]
            owner = owner_of(f"{name}.weight")[: -len(".weight")]
            half = w.dtype == torch.float16
            entry = {"kind": kind, "format": "fp16" if half else "fp32", "bits": 16 if half else 32,
                     "shape": list(w.shape), "weight": owner, "tensors": {"weight": f"{owner}.weight"}}
        modules[name] = entry

    config = {
        "format": FORMAT, "version": VERSION,
        "source": {"checkpoint": os.path.basename(packed_path), "arch": state["qpack"].get("source", {}).get("arch")},
        "architecture": "transformer",
        "activation": a.get("activation_fn", "relu"),
        "encoder": enc, "decoder": dec,
        "share_decoder_input_output_embed": bool(a.get("share_decoder_input_output_embed")),
        "share_all_embeddings": bool(a.get("share_all_embeddings")),
        "attn_temperature": float(a.get("attn_temperature") or 1.0),
        "symbols": {"bos": sd.bos(), "pad": sd.pad(), "eos": sd.eos(), "unk": sd.unk()},
        "dictionaries": {"source": f"dict.{src}.txt", "target": f"dict.{tgt}.txt", "source_lang": src,
                         "target_lang": tgt, "checksum": checksum},
        "weights": "model.safetensors",
        "modules": modules,
        "tensors": {n: {"dtype": t.dtype.name, "shape": list(t.shape)} for n, t in sorted(tensors.items())},
        "sha256": tensors_sha256(tensors),
    }
    _write(out_dir, config, tensors, dict_paths, dicts)
    return config


def _act_range(model, name: str, where: str, bits: int) -> dict:
    """The fixed range of a calibrated activation quantizer as scale and zero point."""
    prefix = f"{name}.act_{'in' if where == 'input' else 'out'}."
    if not bool(model.get(prefix + "initialized", torch.tensor(False))):
        raise QuantConfigError(f"{name}: its activation quantizer has no calibrated range (the model never trained "
                               "with it); the runtime needs a fixed range")
    scale, zp = asym_params(model[prefix + "running_min"].float(), model[prefix + "running_max"].float(), bits)
    return {"act": where, "act_bits": bits, "act_scale": float(scale), "act_zero_point": int(zp)}


def _write(out_dir, config, tensors, dict_paths, dicts):
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, config["weights"]), metadata={"format": FORMAT})
    for d, name in zip(dicts, (config["dictionaries"]["source"], config["dictionaries"]["target"])):
        d.save(os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
        f.write("\n")


def main(argv):
    """``fairseq-qpack --export DIR PACKED.pt [--data DATA_BIN]``."""
    import argparse

    p = argparse.ArgumentParser(prog="fairseq-qpack",
                                description="write a packed checkpoint as a torch-free runtime directory")
    p.add_argument("--export", metavar="DIR", required=True, help="directory to write (created)")
    p.add_argument("packed", help="packed checkpoint written by fairseq-qpack")
    p.add_argument("--data", help="data-bin directory with the dictionaries, if not where the checkpoint says")
    args = p.parse_args(argv)
    config = export_dir(args.packed, args.export, args.data)
    size = os.path.getsize(os.path.join(args.export, config["weights"]))
    print(f"exported {args.packed} to {args.export}: {len(config['modules'])} modules, "
          f"{len(config['tensors'])} tensors, model.safetensors {size:,} bytes")
    return 0
