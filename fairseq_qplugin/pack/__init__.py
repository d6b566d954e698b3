"""Packed checkpoints and inference over packed weights.

bitpack (codes <-> bytes) -> formats (Packed* per method) -> kernels (pure torch) -> modules
(PackedLinear / PackedEmbedding) -> model (``transformer_packed`` arch, load hook) ->
fileformat (the file) -> cli (``fairseq-qpack``). Importing the package registers the architecture.
"""
from . import model  # noqa: F401  (registers transformer_packed)
