"""``transformer_packed``: the model a packed checkpoint builds in fairseq-generate / -interactive.

A packed file's ``cfg.model`` names this architecture and carries the layout (which modules are
packed, how); ``build_model`` builds fairseq's transformer with the source model's arguments and
replaces the listed modules by ``PackedLinear`` / ``PackedEmbedding``. The transformer is built on
the ``meta`` device, so the fp32 matrices that get replaced are never allocated; the rest is
allocated after the swap and filled by ``load_state_dict``.
"""
import argparse
import json
import logging

import torch
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel
from fairseq.models.transformer import transformer_legacy as fairseq_transformer
from fairseq.modules import SinusoidalPositionalEmbedding
from fairseq.utils import safe_getattr
from omegaconf import OmegaConf

from ..errors import QuantConfigError
from ..modules import act_quantizers, set_module
from ..pack.fileformat import dictionary_checksum
from ..pack.modules import PackedEmbedding, PackedLinear, PackedParams
from .base import set_attention_temperature

logger = logging.getLogger(__name__)


def swap_packed(model, layout, int8_kernel="fbgemm"):
    """Replace every module named in ``layout`` by its packed module; tied modules share PackedParams."""
    params = {}
    for name, e in sorted(layout.items(), key=lambda kv: kv[1]["weight"] != kv[0]):
        if e["weight"] not in params:
            params[e["weight"]] = PackedParams(e["method"], e["shape"])
        wq, old = params[e["weight"]], model.get_submodule(name)
        rows, cols = e["shape"]
        if e["kind"] == "embedding":
            new = PackedEmbedding(rows, cols, old.padding_idx, wq)
        else:
            act_in, act_out = act_quantizers(e.get("act", "none"), e.get("act_bits", 8))
            new = PackedLinear(cols, rows, wq, old.bias, act_in=act_in, act_out=act_out, int8_kernel=int8_kernel)
        set_module(model, name, new)


def _materialize(model):
    """Allocate what is still on the meta device (non-packed parameters and buffers; filled by the
    state dict) and rebuild sinusoidal position tables, which are computed, not loaded."""
    model.to_empty(device="cpu")
    for m in model.modules():
        if isinstance(m, SinusoidalPositionalEmbedding):
            m.weights = SinusoidalPositionalEmbedding.get_embedding(m.weights.shape[0], m.embedding_dim, m.padding_idx)


@register_model("transformer_packed")
class TransformerPackedModel(TransformerModel):
    """fairseq's transformer over packed weights (inference only)."""

    @classmethod
    def build_model(cls, args, task):
        if OmegaConf.is_config(args):
            args = argparse.Namespace(**OmegaConf.to_container(args, resolve=True))
        layout = json.loads(args.qpack_layout)
        expected = getattr(args, "qpack_dictionary", None)
        found = dictionary_checksum(task.source_dictionary, task.target_dictionary)
        if expected and expected != found:
            raise QuantConfigError(
                f"the packed checkpoint was made with other dictionaries (checksum {expected}) than the data "
                f"directory's ({found}, {len(task.source_dictionary)}/{len(task.target_dictionary)} symbols); "
                "give fairseq-generate the data directory the model was trained on"
            )
        with torch.device("meta"):
            model = super().build_model(args, task)
        swap_packed(model, layout, getattr(args, "int8_kernel", None) or "fbgemm")
        _materialize(model)
        set_attention_temperature(model, getattr(args, "attn_temperature", None) or 1.0)
        logger.info("packed model: %d packed modules", len(layout))
        return model


@register_model_architecture("transformer_packed", "transformer_packed")
def transformer_packed(args):
    """``int8_kernel`` (set by ``fairseq-qpack --int8-kernel``; at generation time
    ``--model-overrides "{'int8_kernel': 'dequant'}"``): see PackedLinear."""
    args.int8_kernel = safe_getattr(args, "int8_kernel", None) or "fbgemm"
    fairseq_transformer.base_architecture(args)
