"""What only a command gets: one-line errors, and fairseq's loader refusing missing or damaged files.

A program's ``import fairseq_qplugin`` leaves ``sys.excepthook`` and fairseq's loader as they are. A
fairseq command that imports the plugin (``--user-dir``) installs these hooks, and so do the plugin's
commands (``fairseq-qpack``, ``fairseq-qallocate``, ``python -m fairseq_qplugin.results``) when they start.
"""
import functools
import glob
import logging
import os
import sys

from fairseq import checkpoint_utils
from fairseq.distributed import utils as distributed_utils
from fairseq.file_io import PathManager
from fairseq.models import BaseFairseqModel

from .checkpoint import unreadable
from .errors import QuantConfigError, _find_config_error
from .modules.qmodules import drop_unusable_state
from .pack.fileformat import claims_packed, is_packed, validate_packed


def is_command(argv0: str) -> bool:
    """``sys.argv[0]`` of a fairseq or plugin command: a ``fairseq-*`` script or ``python -m fairseq_cli.*``."""
    return os.path.basename(argv0).startswith("fairseq-") or os.path.basename(os.path.dirname(argv0)) == "fairseq_cli"


def checked_state(state, path, arg_overrides=None):
    """``state`` (a loaded checkpoint) if it is not a packed one, or a packed one that is intact."""
    if is_packed(state):
        try:
            overrides = arg_overrides or {}  # the config names fairseq's ``overwrite_args_by_name`` replaces:
            validate_packed(state, path, set(overrides).union(*(v for v in overrides.values() if isinstance(v, dict))))
        except QuantConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged header of unexpected types
            raise QuantConfigError(f"{path}: the packed checkpoint is corrupted ({type(e).__name__}: {e})") from None
    elif claims_packed(state):
        raise QuantConfigError(f"{path}: the config names a packed model but the file has no packed header: "
                               "the file is corrupted; pack the source checkpoint again with fairseq-qpack")
    return state


def _wrap(owner, name, make):
    """Replace ``owner.name`` by ``make(original)``, once."""
    original = getattr(owner, name)
    if not getattr(original, "_qplugin", False):
        wrapper = functools.wraps(original)(make(original))
        wrapper._qplugin = True
        setattr(owner, name, wrapper)


def check_finetune_file(cfg):
    """A missing ``--finetune-from-model`` file, as a one-line error before fairseq-train loads data and
    builds the model. Only where fairseq would load it: no ``checkpoint_last*.pt`` to resume from."""
    ckpt = getattr(cfg, "checkpoint", None)
    path = getattr(ckpt, "finetune_from_model", None)
    if not path or PathManager.exists(path) or ckpt.restore_file != "checkpoint_last.pt":
        return
    if not glob.glob(os.path.join(glob.escape(ckpt.save_dir), "checkpoint_last*.pt")):
        raise QuantConfigError(f"--finetune-from-model {path}: no such file")


def start_command():
    """What a plugin command does first: log INFO lines to stderr in fairseq's format, install the hooks."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        stream=sys.stderr)
    install_command_hooks()


def install_command_hooks():
    """Print an uncaught QuantConfigError as one ``error:`` line (exit status 1) instead of a traceback,
    and make fairseq's checkpoint loading refuse missing, unreadable or corrupted files with one."""

    def excepthook(previous):
        def hook(exc_type, exc, tb):
            err = _find_config_error(exc)
            if err is None:
                return previous(exc_type, exc, tb)
            outer = "" if exc is err else f"\n({exc})"
            sys.stderr.write(f"fairseq-qplugin: error: {err}{outer}\n")
        return hook

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

    def call_main(original):  # fairseq-train (and fairseq-validate) call it right after parsing arguments
        def call(cfg, main, **kwargs):
            check_finetune_file(cfg)
            return original(cfg, main, **kwargs)
        return call

    _wrap(sys, "excepthook", excepthook)
    install_state_filter()
    _wrap(checkpoint_utils, "load_checkpoint_to_cpu", load_checkpoint_to_cpu)
    _wrap(checkpoint_utils, "load_model_ensemble_and_task", load_model_ensemble_and_task)
    _wrap(checkpoint_utils, "load_checkpoint", load_checkpoint)
    _wrap(distributed_utils, "call_main", call_main)


def install_state_filter():
    """Let every fairseq model, a plain ``transformer`` too, load a quantization-aware checkpoint: before
    ``BaseFairseqModel.load_state_dict`` the quantizer entries the model cannot use (codes, latent weights,
    another method's state) are dropped with one info line (``modules.qmodules.drop_unusable_state``), so
    the quantized weights start fine-tuning."""
    def load_state_dict(original):
        def load(self, state_dict, strict=True, model_cfg=None, args=None):
            return original(self, drop_unusable_state(self, state_dict), strict, model_cfg, args)
        return load

    _wrap(BaseFairseqModel, "load_state_dict", load_state_dict)
