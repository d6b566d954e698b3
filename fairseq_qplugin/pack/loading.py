"""The packed-file checks of fairseq's checkpoint loader, installed when a command runs.

``install_load_hook`` wraps ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` so that a file it
cannot read, or a packed file whose header or checksum is wrong, is reported as a QuantConfigError
naming the file (not a traceback from torch's unpickler or from a kernel), and checks the files of
``--path`` (fairseq-generate) and ``--finetune-from-model`` (fairseq-train) before loading them.
A library import leaves the loader unchanged (``fairseq_qplugin.install_command_hooks``).
"""
import functools

from fairseq import checkpoint_utils
from fairseq.file_io import PathManager

from ..checkpoint import unreadable
from ..errors import QuantConfigError
from .fileformat import claims_packed, is_packed, validate_packed


def _overridden(arg_overrides) -> set:
    """The config names fairseq's ``overwrite_args_by_name`` replaces for ``arg_overrides``."""
    names = set(arg_overrides or ())
    for value in (arg_overrides or {}).values():
        if isinstance(value, dict):
            names |= set(value)
    return names


def checked_state(state, path, arg_overrides=None):
    """``state`` (a loaded checkpoint) if it is not a packed one, or a packed one that is intact."""
    if is_packed(state):
        try:
            validate_packed(state, path, _overridden(arg_overrides))
        except QuantConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged header of unexpected types
            raise QuantConfigError(f"{path}: the packed checkpoint is corrupted ({type(e).__name__}: {e})") from None
    elif claims_packed(state):
        raise QuantConfigError(f"{path}: the config names a packed model but the file has no packed header: "
                               "the file is corrupted; pack the source checkpoint again with fairseq-qpack")
    return state


def _wrap(name, make):
    original = getattr(checkpoint_utils, name)
    if not getattr(original, "_qplugin", False):
        wrapper = functools.wraps(original)(make(original))
        wrapper._qplugin = True
        setattr(checkpoint_utils, name, wrapper)


def install_load_hook():
    """Make fairseq's checkpoint loading report missing, unreadable or corrupted files as QuantConfigError."""

    def load_checkpoint_to_cpu(original):
        def load(path, arg_overrides=None, load_on_all_ranks=False):
            try:
                state = original(path, arg_overrides, load_on_all_ranks)
            except QuantConfigError:
                raise
            except FileNotFoundError:
                raise QuantConfigError(f"{path}: no such file") from None
            except Exception as e:  # noqa: BLE001
                raise unreadable(path, e) from e
            return checked_state(state, path, arg_overrides)
        return load

    def load_model_ensemble_and_task(original):
        def load(filenames, arg_overrides=None, task=None, strict=True, suffix="", num_shards=1, state=None):
            missing = [f for f in filenames if not PathManager.exists(f)]
            if missing and state is None and not suffix and num_shards == 1:
                raise QuantConfigError(f"--path {missing[0]}: no such file")
            return original(filenames, arg_overrides, task, strict, suffix, num_shards, state)
        return load

    def load_checkpoint(original):
        def load(cfg, trainer, **kwargs):
            try:
                return original(cfg, trainer, **kwargs)
            except ValueError:
                if cfg.finetune_from_model and not PathManager.exists(cfg.finetune_from_model):
                    raise QuantConfigError(f"--finetune-from-model {cfg.finetune_from_model}: no such file") from None
                raise
        return load

    _wrap("load_checkpoint_to_cpu", load_checkpoint_to_cpu)
    _wrap("load_model_ensemble_and_task", load_model_ensemble_and_task)
    _wrap("load_checkpoint", load_checkpoint)
