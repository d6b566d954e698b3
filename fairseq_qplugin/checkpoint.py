"""Loading fairseq checkpoints under torch >= 2.6, where ``torch.load`` defaults to ``weights_only=True``.

fairseq calls ``torch.load(f, map_location=cpu)`` without ``weights_only``. Its checkpoints pickle the
training arguments as an ``argparse.Namespace`` (and, in older checkpoints, numpy scalars for the best
validation loss). In data-parallel training, rank 0 loads a checkpoint (``--finetune-from-model`` or a
resume) and sends it to the other ranks with ``distributed_utils.broadcast_object``, which pickles it
with its config turned into an omegaconf ``DictConfig`` (and its tensors replaced by placeholders); the
other ranks ``torch.load`` that. We add exactly the classes these pickles hold to torch's allow-list
instead of turning ``weights_only`` off, so loading still never runs arbitrary pickled code.
"""
import argparse
import collections
import logging
import os
import typing

import numpy as np
import torch

from .errors import QuantConfigError

logger = logging.getLogger(__name__)


def _numpy_globals():
    """The numpy classes a pickled numpy scalar needs (``np.float64(1.5)`` pickles as these)."""
    multiarray = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return [multiarray.multiarray.scalar, np.dtype, *dtypes]


def _broadcast_globals():
    """What a checkpoint sent by ``distributed_utils.broadcast_object`` holds besides tensors: the
    config (omegaconf containers of ``AnyNode`` values, their metadata, which names ``typing.Any``,
    ``dict``, ``list``, ``int`` and a ``defaultdict`` of flags) and fairseq's tensor placeholders.
    Found by listing the globals of real payloads (``torch.serialization.get_unsafe_globals_in_checkpoint``)."""
    from fairseq.distributed.utils import _TensorPlaceholder
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    return [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any, dict, list, int,
            collections.defaultdict, _TensorPlaceholder]


FAIRSEQ_CHECKPOINT_GLOBALS = [argparse.Namespace, *_numpy_globals(), *_broadcast_globals()]


def allow_fairseq_checkpoints():
    """Allow-list the non-tensor classes found in fairseq checkpoints (no-op on torch < 2.4)."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is None:
        return
    add(FAIRSEQ_CHECKPOINT_GLOBALS)
    logger.debug("allow-listed %d classes for fairseq checkpoints", len(FAIRSEQ_CHECKPOINT_GLOBALS))


def unreadable(path, e: Exception) -> QuantConfigError:
    """The one-line error for a file ``torch.load`` could not read (truncated zip, bad or crafted pickle)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = next((line for line in lines if "unsupported global" in line.lower()), lines[0] if lines else "")
    if "unsupported global" in reason.lower():
        return QuantConfigError(f"{path}: refused: the file pickles a class that is not allowed in a checkpoint "
                                f"({reason[:200]}); loading never runs code from a file")
    return QuantConfigError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {reason[:200]}); "
                            "the file is truncated or corrupted")


def load_state(path) -> dict:
    """``torch.load`` of a checkpoint with ``weights_only=True`` (fairseq's classes allow-listed), as the
    plugin loads every file: a missing, damaged or crafted file raises a one-line QuantConfigError."""
    allow_fairseq_checkpoints()
    if not os.path.isfile(path):
        raise QuantConfigError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad or crafted pickle, ...
        raise unreadable(path, e) from None
