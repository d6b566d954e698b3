"""User-facing errors: bad flags and bad checkpoints are reported as one clear message, not a traceback."""
import sys


class QuantConfigError(ValueError):
    """A flag, configuration or checkpoint the plugin cannot use; the message says what to change."""


def _find_config_error(exc):
    """The QuantConfigError in ``exc``'s chain (fairseq re-raises load errors as a generic Exception)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, QuantConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install_error_hook():
    """Print an uncaught QuantConfigError as ``error: ...`` (exit status 1) instead of a traceback.

    Only the command-line tools are affected; library callers still receive the exception. Any
    other exception goes to the previous hook unchanged.
    """
    previous = sys.excepthook
    if getattr(previous, "_qplugin", False):
        return

    def hook(exc_type, exc, tb):
        err = _find_config_error(exc)
        if err is None:
            return previous(exc_type, exc, tb)
        outer = "" if exc is err else f"\n({exc})"
        sys.stderr.write(f"fairseq-qplugin: error: {err}{outer}\n")

    hook._qplugin = True
    sys.excepthook = hook
