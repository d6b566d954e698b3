"""The Python API: quantize a loaded fairseq model, load a packed (or QAT) checkpoint hub-style.

    from fairseq_qplugin import quantize_model, load_packed

    quantize_model(hub_or_model, method="int", bits=4)   # the module swap the architectures use
    hub = load_packed("model.packed.pt", data="data-bin", sentencepiece_model="spm.model")
    hub.translate("Hello world.", beam=5)

Both are documented with runnable snippets in docs/api.md (executed by tests/test_api.py).
"""
import argparse
import logging
import os
from typing import Dict, Optional

from .models.base import set_attention_temperature, quantization_summary
from .quant import QuantSpec

logger = logging.getLogger(__name__)


def _models(model_or_hub):
    """The fairseq models behind a hub interface (``.models``), or the model itself."""
    models = getattr(model_or_hub, "models", None)
    return list(models) if models is not None else [model_or_hub]


def quantize_model(model, method: str = "int", bits: int = 8, scheme: str = "sym",
                   granularity: Optional[str] = None, include: str = "all", exclude: str = "") -> Dict[str, float]:
    """Quantize a loaded fairseq ``TransformerModel`` (or a hub interface from ``from_pretrained``) in
    place, post-training: the same module swap ``transformer_int8`` / ``_bcq`` / ``_kmeans`` and
    ``fairseq-qpack --method`` use, so the result translates exactly as ``fairseq-qpack fp32.pt
    out.pt --method M --bits N`` does.

    method: "int" (range-based linear; 1 bit = sign binarization), "bcq" (binary codes) or "kmeans"
        (weight sharing); bits: per weight (int 1-8, bcq 1-4, kmeans 1-8); scheme: "sym" or "asym"
        (int only); granularity: "channel" or "tensor" (default: channel; tensor for kmeans);
        include / exclude: comma lists of parts (all, embeddings, encoder, decoder, self_attn,
        cross_attn, ffn, output_projection) or globs over module names.

    Returns the summary of the last model (quantized weights, average bits, packed size in bytes).
    Bad values raise QuantConfigError with one line saying what to change.
    """
    from .pack.cli import PTQ_GRANULARITY, post_training_quantize

    args = argparse.Namespace(method=method, bits=bits, scheme=scheme, include=include, exclude=exclude,
                              granularity=granularity or PTQ_GRANULARITY.get(method, "channel"))
    QuantSpec(method=method, bits=bits, scheme=scheme, granularity=args.granularity)  # validates first
    summary = {}
    for m in _models(model):
        post_training_quantize(m, args)
        set_attention_temperature(m, 1.0)  # fairseq's fused attention would read the float weights
        summary = quantization_summary(m)
    logger.info("quantized %d weights to %s %d-bit (%.2f bits with scales)", summary["quantized_params"], method, bits,
                summary["avg_bits"])
    return summary


def load_packed(path, data: Optional[str] = None, sentencepiece_model: Optional[str] = None, **overrides):
    """A fairseq hub interface (``GeneratorHubInterface``: ``translate``, ``sample``, ``generate``) over
    a packed file from ``fairseq-qpack`` (or any checkpoint of the plugin's architectures).

    data: the data-bin directory with the dictionaries (``dict.SRC.txt``, ``dict.TGT.txt``); default:
        the packed file's directory if they are there, else the directory the model was trained on.
    sentencepiece_model: the sentencepiece model of the training data, so ``translate`` takes and
        returns plain text; without it, ``translate`` takes and returns pieces.
    overrides: further fairseq model arguments, e.g. ``int8_kernel="dequant"``.
    """
    import torch
    from fairseq.models.transformer import TransformerModel

    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if data is None:
        if any(f.startswith("dict.") for f in os.listdir(folder)):
            data = folder
        else:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["cfg"]["task"]["data"]
    if sentencepiece_model is not None:
        overrides.update(bpe="sentencepiece", sentencepiece_model=os.path.abspath(os.fspath(sentencepiece_model)))
    hub = TransformerModel.from_pretrained(folder, checkpoint_file=os.path.basename(path),
                                           data_name_or_path=os.path.abspath(os.fspath(data)), **overrides)
    return hub.eval()
