"""What only a command line gets: one-line errors and fairseq's loader checking packed files.

``import fairseq_qplugin`` in a program leaves ``sys.excepthook`` and fairseq's checkpoint loader as
they are. ``install_command_hooks`` installs both hooks; the package calls it when a fairseq command
imports it (``fairseq-train --user-dir fairseq_qplugin``, ``fairseq-generate``, ...,
``python -m fairseq_cli.train``), and the plugin's own commands (``fairseq-qpack``,
``fairseq-qallocate``, ``python -m fairseq_qplugin.results``) call it when they start.
"""
import os


def is_command(argv0: str) -> bool:
    """Whether the process is a fairseq or plugin command: a ``fairseq-*`` console script or a
    ``python -m fairseq_cli.*`` module (``sys.argv[0]``)."""
    return os.path.basename(argv0).startswith("fairseq-") or os.path.basename(os.path.dirname(argv0)) == "fairseq_cli"


def install_command_hooks():
    """Print an uncaught QuantConfigError as one ``error:`` line (errors.py) and make fairseq's
    checkpoint loader refuse missing, unreadable and corrupted packed files with one (pack/loading.py)."""
    from .errors import install_error_hook
    from .pack.loading import install_load_hook

    install_error_hook()
    install_load_hook()
