"""fairseq-qruntime: torch-free translation with models exported by ``fairseq-qpack --export``.

    from fairseq_qruntime import Translator
    t = Translator("model_dir", threads=2)
    t.translate(["▁Hello ▁world"], beam=5)

Imports neither torch nor fairseq: a C++ engine (csrc/engine.cpp, the project's packed-weight
kernels) through ctypes, numpy and safetensors. ``fairseq-qtranslate`` is the command line.
"""
from .model import Dictionary, Model, ModelError, NativeUnavailable, load_library  # noqa: F401
from .translator import Translator  # noqa: F401
