"""Loading fairseq checkpoints under torch >= 2.6, where ``torch.load`` defaults to ``weights_only=True``.

fairseq calls ``torch.load(f, map_location=cpu)`` without ``weights_only``; its checkpoints pickle the
training arguments as an ``argparse.Namespace`` (and, in older checkpoints, numpy scalars for the best
validation loss). We add exactly those classes to torch's allow-list instead of turning
``weights_only`` off, so loading still never runs arbitrary pickled code.
"""
import argparse
import logging

import numpy as np
import torch

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
