"""Packed checkpoints: the formats, their kernels and modules, the file and ``fairseq-qpack``.

bitpack (codes <-> bytes) -> formats (Packed* per method) -> kernels (pure torch) -> modules
(PackedLinear / PackedEmbedding) -> fileformat (the file) -> loading (fairseq's loader checks
packed files) -> cli (``fairseq-qpack``). The ``transformer_packed`` architecture that loads them
is ``models/transformer_packed.py``.
"""
