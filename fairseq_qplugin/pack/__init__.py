"""Packed checkpoints: bitpack (codes <-> bytes) -> formats (Packed* per method) -> kernels -> modules
(PackedLinear / PackedEmbedding) -> fileformat (the file) -> cli (``fairseq-qpack``). The model that
loads them is ``models/transformer_packed.py``; the checks of fairseq's loader, ``commands.py``.
"""
