"""Loading fairseq checkpoints under torch >= 2.6, where ``torch.load`` defaults to ``weights_only=True``.

fairseq calls ``torch.load(f, map_location=cpu)`` without ``weights_only``; its checkpoints pickle the
training arguments as an ``argparse.Namespace`` (and, in older checkpoints, numpy scalars for the best
validation loss). We add exactly those classes to torch's allow-list instead of turning
``weights_only`` off, so loading still never runs arbitrary pickled code.
"""
import argparse
import logging
import os

import numpy as np
import torch

from .errors import QuantConfigError

logger = logging.getLogger(__name__)


def _numpy_globals():
    """The numpy classes a pickled numpy scalar needs (``np.float64(1.5)`` pickles as these)."""
    multiarray = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return [multiarray.multiarray.scalar, np.dtype, *dtypes]


FAIRSEQ_CHECKPOINT_GLOBALS = [argparse.Namespace, *_numpy_globals()]


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
