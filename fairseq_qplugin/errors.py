"""User-facing errors: bad flags and bad checkpoints are reported as one clear message, not a traceback
(commands.py prints them as one line when a command runs)."""


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

