"""Packed checkpoints: quant/bitpack and quant/packed (the Packed* format of each method) -> kernels -> modules
(PackedLinear / PackedEmbedding) -> fileformat (the file) -> cli (``fairseq-qpack``). The model that
loads them is ``models/transformer_packed.py``; the checks of fairseq's loader, ``commands.py``.
"""
