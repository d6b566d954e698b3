"""fairseq-qplugin: quantization-aware training and compact inference for fairseq Transformers.

Importing the package (``--user-dir fairseq_qplugin`` or ``import fairseq_qplugin``) registers the
architectures (the packed one too), the pNR optimizers and the distillation criterion, and makes
fairseq checkpoints loadable under torch >= 2.6.

    from fairseq_qplugin import quantize_model, load_packed   # the Python API (docs/api.md)
"""
__version__ = "0.2.0"

from .checkpoint import allow_fairseq_checkpoints
from .errors import install_error_hook

allow_fairseq_checkpoints()
install_error_hook()

from . import models  # noqa: E402,F401  (registers the architectures)
from . import optim  # noqa: E402,F401  (registers pnr_<optimizer>)
from . import criterions  # noqa: E402,F401  (registers label_smoothed_cross_entropy_distill)
from . import pack  # noqa: E402,F401  (registers transformer_packed)

pack.model.install_load_hook()

from .api import load_packed, quantize_model  # noqa: E402,F401
