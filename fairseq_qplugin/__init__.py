"""fairseq-qplugin: quantization-aware training and compact inference for fairseq Transformers.

Importing the package (``--user-dir fairseq_qplugin`` or ``import fairseq_qplugin``) registers the
architectures (the packed one too), the pNR optimizers and the distillation criterion, and makes
fairseq checkpoints loadable under torch >= 2.6. Only a command (fairseq's or the plugin's) also
gets one-line errors and the packed-file checks of fairseq's loader (commands.py).

    from fairseq_qplugin import quantize_model, load_packed   # the Python API (docs/api.md)
"""
__version__ = "0.2.0"

import sys

from .checkpoint import allow_fairseq_checkpoints
from .commands import install_command_hooks, is_command

allow_fairseq_checkpoints()
if is_command(getattr(sys, "argv", None) and sys.argv[0] or ""):
    install_command_hooks()

from . import models  # noqa: E402,F401  (registers the architectures, transformer_packed too)
from . import optim  # noqa: E402,F401  (registers pnr_<optimizer>)
from . import criterions  # noqa: E402,F401  (registers label_smoothed_cross_entropy_distill)
from .api import load_packed, quantize_model  # noqa: E402,F401
