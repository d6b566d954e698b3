"""``transformer_packed``: the model a packed checkpoint builds in fairseq-generate / -interactive.

A packed file's ``cfg.model`` names this architecture and carries the layout (which modules are
packed, how); ``build_model`` builds fairseq's transformer with the source model's arguments and
replaces the listed modules by ``PackedLinear`` / ``PackedEmbedding``. The transformer is built on
the ``meta`` device, so the fp32 matrices that get replaced are never allocated; the rest is
allocated after the swap and filled by ``load_state_dict``.

``install_load_hook`` wraps ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` so that a file it
cannot read, or a packed file whose header or checksum is wrong, is reported as a QuantConfigError
naming the file (not a traceback from torch's unpickler or from a kernel), and checks the files of
``--path`` (fairseq-generate) and ``--finetune-from-model`` (fairseq-train) before loading them.
"""
import argparse
import functools
import json
import logging

import torch
from fairseq import checkpoint_utils
from fairseq.file_io import PathManager
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel
from fairseq.models.transformer import transformer_legacy as fairseq_transformer
from fairseq.modules import SinusoidalPositionalEmbedding
from fairseq.utils import safe_getattr
from omegaconf import OmegaConf

from ..checkpoint import unreadable
from ..errors import QuantConfigError
from ..models.base import set_attention_temperature
from ..modules import ActQuantizer
from .fileformat import claims_packed, dictionary_checksum, is_packed, validate_packed
from .modules import PackedEmbedding, PackedLinear, PackedParams

logger = logging.getLogger(__name__)


def _set_module(model, name, new):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


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
            act = ActQuantizer(e.get("act_bits", 8)) if e.get("act", "none") != "none" else None
            new = PackedLinear(cols, rows, wq, old.bias, act_in=act if e.get("act") == "input" else None,
                               act_out=act if e.get("act") == "output" else None, int8_kernel=int8_kernel)
        _set_module(model, name, new)


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


def _overridden(arg_overrides) -> set:
    """The config names fairseq's ``overwrite_args_by_name`` replaces for ``arg_overrides``."""
    names = set(arg_overrides or ())
    for value in (arg_overrides or {}).values():
        if isinstance(value, dict):
            names |= set(value)
    return names


def checked_state(state, path, arg_overrides=None):
    """``state`` (a loaded checkpoint) if it is not a packed one, or a packed one that is intact."""
    if is_packed(state):
        try:
            validate_packed(state, path, _overridden(arg_overrides))
        except QuantConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged header of unexpected types
            raise QuantConfigError(f"{path}: the packed checkpoint is corrupted ({type(e).__name__}: {e})") from None
    elif claims_packed(state):
        raise QuantConfigError(f"{path}: the config names a packed model but the file has no packed header: "
                               "the file is corrupted; pack the source checkpoint again with fairseq-qpack")
    return state


def _wrap(name, make):
    original = getattr(checkpoint_utils, name)
    if not getattr(original, "_qplugin", False):
        wrapper = functools.wraps(original)(make(original))
        wrapper._qplugin = True
        setattr(checkpoint_utils, name, wrapper)


def install_load_hook():
    """Make fairseq's checkpoint loading report missing, unreadable or corrupted files as QuantConfigError."""

    def load_checkpoint_to_cpu(original):
        def load(path, arg_overrides=None, load_on_all_ranks=False):
            try:
                state = original(path, arg_overrides, load_on_all_ranks)
            except QuantConfigError:
                raise
            except FileNotFoundError:
                raise QuantConfigError(f"{path}: no such file") from None
            except Exception as e:  # noqa: BLE001
                raise unreadable(path, e) from e
            return checked_state(state, path, arg_overrides)
        return load

    def load_model_ensemble_and_task(original):
        def load(filenames, arg_overrides=None, task=None, strict=True, suffix="", num_shards=1, state=None):
            missing = [f for f in filenames if not PathManager.exists(f)]
            if missing and state is None and not suffix and num_shards == 1:
                raise QuantConfigError(f"--path {missing[0]}: no such file")
            return original(filenames, arg_overrides, task, strict, suffix, num_shards, state)
        return load

    def load_checkpoint(original):
        def load(cfg, trainer, **kwargs):
            try:
                return original(cfg, trainer, **kwargs)
            except ValueError:
                if cfg.finetune_from_model and not PathManager.exists(cfg.finetune_from_model):
                    raise QuantConfigError(f"--finetune-from-model {cfg.finetune_from_model}: no such file") from None
                raise
        return load

    _wrap("load_checkpoint_to_cpu", load_checkpoint_to_cpu)
    _wrap("load_model_ensemble_and_task", load_model_ensemble_and_task)
    _wrap("load_checkpoint", load_checkpoint)
