"""Export of packed checkpoints for the torch-free runtime (``fairseq-qpack --export``, export.py).

The runtime itself (engine, ``Translator``, ``fairseq-qtranslate``) is the top-level package
``fairseq_qruntime``: it imports neither torch nor fairseq, which a subpackage of fairseq_qplugin
could not promise (importing fairseq_qplugin registers its fairseq architectures).
"""
