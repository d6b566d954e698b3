"""Exact export of an 8-bit ``transformer_int8`` model to CTranslate2 (``fairseq-qpack --export-ctranslate2``).

A symmetric 8-bit int weight (``--quant-bits 8 --quant-scheme sym``) is ``w = (code - 128) * s`` with
``s = max|w_row| / 127`` (per row, or one per tensor): the same grid as CTranslate2's int8 weights,
which store ``q = round(w * S)`` with ``S = 127 / max|w_row|`` and compute ``w = q / S``. So the
export writes ``q = code - 128`` (int8, bit for bit the QAT codes) and ``S = 1 / s`` per row without
rounding any weight again; biases, layer norms and unquantized weights stay float32. The model spec
is built directly (CTranslate2's own fairseq converter only knows fairseq's architecture names) with
the layout that converter uses: fused QKV self-attention projections, fused KV cross-attention
projections, sinusoidal position tables without fairseq's padding offset, decoding started with
``</s>`` and ``</s>`` appended to the source, as ``fairseq-generate`` does.

Anything CTranslate2 cannot compute exactly (other bit widths, asymmetric ranges, BCQ / k-means
codes, activation quantization, an attention temperature) is refused with one line.

    import ctranslate2
    translator = ctranslate2.Translator("ct2_dir", compute_type="int8")   # or "float32"
    translator.translate_batch([["▁Hello", "▁world", "."]], beam_size=5)
"""
import logging
import os
import struct
from typing import Dict, Tuple

import numpy as np
import torch

from ..errors import QuantConfigError
from ..modules import QuantEmbedding, QuantLinear

logger = logging.getLogger(__name__)
ACTIVATIONS = {"relu": "RELU", "gelu": "GELU", "gelu_accurate": "GELUTanh", "gelu_fast": "GELUTanh"}
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # CTranslate2's DataType ids


def _import_ctranslate2():
    try:
        import ctranslate2  # noqa: F401
        from ctranslate2.specs import common_spec, transformer_spec
    except ImportError:
        raise QuantConfigError("--export-ctranslate2 needs the ctranslate2 package: "
                               "pip install 'fairseq-qplugin[bench]' (or pip install ctranslate2)") from None
    return common_spec, transformer_spec


def int8_weight(name: str, module) -> Tuple[np.ndarray, np.ndarray]:
    """(int8 codes - 128 [rows, cols], CTranslate2 scale 1/s [rows] float32) of a quantized module,
    or a QuantConfigError naming the module if its codes are not symmetric 8-bit int."""
    spec = module.wq.spec
    if (spec.method, spec.bits, spec.scheme) != ("int", 8, "sym"):
        what = f"{spec.bits}-bit {spec.method}" + (f" ({spec.scheme})" if spec.method == "int" else "")
        raise QuantConfigError(
            f"--export-ctranslate2 takes symmetric 8-bit int weights (transformer_int8 --quant-bits 8 "
            f"--quant-scheme sym); {name} is {what}: pack it with fairseq-qpack instead")
    qw = module.wq.quantized(module.weight.detach())
    if not torch.all(qw.zero_point == 128) or int(qw.codes.min()) < 1:
        raise QuantConfigError(f"{name}: codes are not symmetric 8-bit (zero point 128, codes 1-255)")
    rows = qw.codes.shape[0]
    codes = (qw.codes.to(torch.int16) - 128).to(torch.int8).numpy()
    scale = (1.0 / qw.scale.double()).float().expand(rows, 1).reshape(rows).numpy().copy()
    return codes, scale


class _Writer:
    """Fills a CTranslate2 TransformerSpec from a fairseq transformer whose modules may be quantized."""

    def __init__(self, common_spec, names: Dict[int, str]):
        self.common_spec, self.names = common_spec, names
        self.int8 = {}  # spec variable path -> the int8 codes written there (for verification)

    def weight(self, spec, module, path):
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            spec.weight, spec.weight_scale = int8_weight(self.names[id(module)], module)
            if path is not None:  # None: one part of a fused projection (recorded by ``fused``)
                self.int8[path] = spec.weight
        else:
            spec.weight = module.weight.detach().float().numpy()

    def linear(self, spec, module, path):
        self.weight(spec, module, path)
        if module.bias is not None:
            spec.bias = module.bias.detach().float().numpy()

    def fused(self, spec, modules, path):
        """One linear spec for several projections stacked by rows (all int8 or all float)."""
        parts = [self.common_spec.LinearSpec() for _ in modules]
        for part, module in zip(parts, modules):
            self.linear(part, module, None)
        quantized = [isinstance(m, QuantLinear) for m in modules]
        if any(quantized) and not all(quantized):
            raise QuantConfigError("--export-ctranslate2: the q/k/v projections of one attention layer must be "
                                   "all quantized or all float (CTranslate2 fuses them); change --quant-include")
        spec.weight = np.concatenate([p.weight for p in parts])
        if all(quantized):
            spec.weight_scale = np.concatenate([p.weight_scale for p in parts])
            self.int8[path] = spec.weight
        spec.bias = np.concatenate([p.bias if p.has_bias() else np.zeros(p.weight.shape[0], np.float32)
                                    for p in parts])

    def layer_norm(self, spec, module):
        spec.gamma = module.weight.detach().float().numpy()
        spec.beta = module.bias.detach().float().numpy()

    def attention(self, spec, module, path, self_attention):
        if self_attention:
            self.fused(spec.linear[0], [module.q_proj, module.k_proj, module.v_proj], f"{path}/linear_0/weight")
        else:
            self.linear(spec.linear[0], module.q_proj, f"{path}/linear_0/weight")
            self.fused(spec.linear[1], [module.k_proj, module.v_proj], f"{path}/linear_1/weight")
        self.linear(spec.linear[-1], module.out_proj, f"{path}/linear_{len(spec.linear) - 1}/weight")

    def stack(self, spec, module, path, decoder):
        positions = module.embed_positions
        table = positions.weight if isinstance(positions, torch.nn.Embedding) else positions.weights
        spec.position_encodings.encodings = table.detach().float().numpy()[positions.padding_idx + 1:]
        self.weight(spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings,
                    module.embed_tokens, f"{path}/embeddings_0/weight" if isinstance(spec.embeddings, list)
                    else f"{path}/embeddings/weight")
        spec.scale_embeddings = module.embed_scale
        if decoder:
            self.linear(spec.projection, module.output_projection, f"{path}/projection/weight")
        for i, (layer_spec, layer) in enumerate(zip(spec.layer, module.layers)):
            lp = f"{path}/layer_{i}"
            self.linear(layer_spec.ffn.linear_0, layer.fc1, f"{lp}/ffn/linear_0/weight")
            self.linear(layer_spec.ffn.linear_1, layer.fc2, f"{lp}/ffn/linear_1/weight")
            self.layer_norm(layer_spec.ffn.layer_norm, layer.final_layer_norm)
            self.attention(layer_spec.self_attention, layer.self_attn, f"{lp}/self_attention", True)
            self.layer_norm(layer_spec.self_attention.layer_norm, layer.self_attn_layer_norm)
            if decoder:
                self.attention(layer_spec.attention, layer.encoder_attn, f"{lp}/attention", False)
                self.layer_norm(layer_spec.attention.layer_norm, layer.encoder_attn_layer_norm)
        if module.layer_norm is not None:
            self.layer_norm(spec.layer_norm, module.layer_norm)


def vocabulary(dictionary):
    """A fairseq dictionary's symbols as CTranslate2 tokens (its padding token is ``<blank>``)."""
    return ["<blank>" if t == "<pad>" else t for t in dictionary.symbols]


def check_supported(model, args):
    """One-line QuantConfigError for what CTranslate2 cannot run exactly as the plugin does."""
    quantized = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    if not quantized:
        raise QuantConfigError("--export-ctranslate2 exports a transformer_int8 checkpoint trained with "
                               "--quant-bits 8 --quant-scheme sym; this one has no quantized module")
    problems = {
        "--quant-act": getattr(args, "quant_act", "none") not in (None, "none"),
        "--attn-temperature": (getattr(args, "attn_temperature", None) or 1.0) != 1.0,
        f"--activation-fn {getattr(args, 'activation_fn', 'relu')}": getattr(args, "activation_fn", "relu")
        not in ACTIVATIONS,
        "--encoder-normalize-before != --decoder-normalize-before":
            bool(args.encoder_normalize_before) != bool(args.decoder_normalize_before),
        "--encoder-attention-heads != --decoder-attention-heads":
            args.encoder_attention_heads != args.decoder_attention_heads,
        "--layernorm-embedding": bool(getattr(args, "layernorm_embedding", False)),
        "--no-token-positional-embeddings": bool(getattr(args, "no_token_positional_embeddings", False)),
    }
    bad = [flag for flag, found in problems.items() if found]
    if bad:
        raise QuantConfigError(f"--export-ctranslate2: CTranslate2 cannot run a model trained with {bad[0]} "
                               "exactly; export it with fairseq-qpack (packed file) instead")


def export_ctranslate2(model, args, src_dict, tgt_dict, output_dir: str) -> Dict[str, np.ndarray]:
    """Write ``model`` (a loaded fairseq transformer, its modules quantized by transformer_int8) as a
    CTranslate2 model directory; return {spec variable path: int8 codes written} (checked on disk)."""
    common_spec, transformer_spec = _import_ctranslate2()
    check_supported(model, args)
    spec = transformer_spec.TransformerSpec.from_config(
        (args.encoder_layers, args.decoder_layers), args.encoder_attention_heads,
        pre_norm=bool(args.encoder_normalize_before),
        activation=getattr(common_spec.Activation, ACTIVATIONS[getattr(args, "activation_fn", "relu")]),
    )
    names = {id(m): n for n, m in model.named_modules()}
    writer = _Writer(common_spec, names)
    with torch.no_grad():
        writer.stack(spec.encoder, model.encoder, "encoder", decoder=False)
        writer.stack(spec.decoder, model.decoder, "decoder", decoder=True)
    spec.register_source_vocabulary(vocabulary(src_dict))
    spec.register_target_vocabulary(vocabulary(tgt_dict))
    spec.config.decoder_start_token = spec.config.eos_token  # fairseq starts decoding with </s>
    spec.config.add_source_eos = True
    spec.validate()
    spec.optimize(quantization=None)  # aliases tied tensors; quantizes nothing
    os.makedirs(output_dir, exist_ok=True)
    spec.save(output_dir)
    verify_int8(output_dir, writer.int8)
    logger.info("wrote CTranslate2 model %s: %d int8 weight matrices (codes unchanged)", output_dir, len(writer.int8))
    return writer.int8


def read_model_bin(path: str) -> Dict[str, np.ndarray]:
    """The variables of a CTranslate2 ``model.bin`` (aliases resolved), as numpy arrays."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return values

    def string():
        nonlocal pos
        (n,) = take("H")
        s = data[pos:pos + n - 1].decode("utf-8")
        pos += n
        return s

    take("I"), string(), take("I")  # binary version, spec name, spec revision
    out = {}
    for _ in range(take("I")[0]):
        name = string()
        (rank,) = take("B")
        shape = take(f"{rank}I") if rank else ()
        (dtype,), (nbytes,) = take("B"), take("I")
        out[name] = np.frombuffer(data, DTYPES[dtype], nbytes // np.dtype(DTYPES[dtype]).itemsize, pos).reshape(shape)
        pos += nbytes
    for _ in range(take("I")[0]):
        alias, target = string(), string()
        out[alias] = out[target]
    return out


def verify_int8(output_dir: str, written: Dict[str, np.ndarray]):
    """Re-read ``model.bin`` and check every int8 matrix is the one written, bit for bit."""
    on_disk = read_model_bin(os.path.join(output_dir, "model.bin"))
    for path, codes in written.items():
        found = on_disk.get(path)
        if found is None or found.dtype != np.int8 or not np.array_equal(found, codes):
            raise QuantConfigError(f"{output_dir}: {path} was not written as the int8 codes "
                                   f"(found {None if found is None else found.dtype}); the export is wrong")


def main_export(args):
    """``fairseq-qpack --export-ctranslate2 DIR CHECKPOINT [--data DATA_BIN]``."""
    from fairseq import checkpoint_utils

    overrides = {"data": args.data} if args.data else None
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([args.checkpoint], arg_overrides=overrides)
    model = models[0].eval()
    if args.method:  # post-training quantization of a plain fp32 checkpoint, as fairseq-qpack --method does
        from .cli import post_training_quantize
        post_training_quantize(model, args)
    written = export_ctranslate2(model, cfg.model, task.source_dictionary, task.target_dictionary,
                                 args.export_ctranslate2)
    print(f"wrote {args.export_ctranslate2}: CTranslate2 model, {len(written)} int8 weight matrices "
          f"with the checkpoint's codes (compute_type int8 or float32)")
    return written
