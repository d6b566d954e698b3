from . import transformer_int8  # noqa: F401  (registers transformer_int8 and its presets)
