from setuptools import find_packages, setup

setup(
    name="fairseq-qplugin",
    version="0.1.0",
    description="Quantization-aware training and compact inference for fairseq Transformer translation models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.8",
    packages=find_packages(include=["fairseq_qplugin", "fairseq_qplugin.*"]),
    install_requires=[
        "torch>=2.0",
        # The official fairseq 0.12.2 does not import on Python >= 3.11; fairseq-fixed is a
        # maintained fork that installs the same `fairseq` module.
        "fairseq-fixed>=0.12.3.1; python_version >= '3.11'",
        "fairseq>=0.12.2; python_version < '3.11'",
        "sacrebleu>=2.0",
        "sentencepiece",
        "sacremoses",  # Moses tokenization (WMT recipes) and tokenized BLEU with compound splitting
        "subword-nmt",
        "numpy",
        "matplotlib",  # python -m fairseq_qplugin.analysis (weight histograms)
    ],
    extras_require={"test": ["pytest"], "bench": ["ctranslate2>=4.0"]},
    entry_points={"console_scripts": ["fairseq-qpack = fairseq_qplugin.pack.cli:main"]},
)
