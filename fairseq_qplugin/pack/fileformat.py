"""The packed checkpoint file: one ``torch.save`` of plain dicts, lists, strings, numbers and tensors.

It loads with ``torch.load(weights_only=True)`` and no allow-list, and it is also a fairseq
checkpoint (``fairseq-generate --path packed.pt``)::

    {
      "cfg":   fairseq's config as plain dicts; cfg["model"] is the source model's arguments with
               _name/arch = "transformer_packed", qpack_layout (JSON of the layout below) and
               qpack_dictionary (checksum of the dictionaries it was trained with),
      "model": {name: tensor}: packed weights under "<module>.wq.<field>" (tied modules list the
               same tensors, which torch.save stores once), every other tensor of the model in
               fp16 or fp32,
      "qpack": header {"format": "fairseq-qpack", "version": 2, "layout": {module: entry},
               "sha256": of every tensor's bytes in key order, "config": the same object as "cfg"
               (pickled once), "header_sha256": of the rest of the header, "source": {...}},
      "optimizer_history": [{... "num_updates": n}] (no optimizer state), "extra_state": {},
    }

A layout entry: {"kind": "linear"|"embedding", "method": "int"|"bcq"|"kmeans", "bits": int,
"shape": [rows, cols], "weight": the module whose tensors it uses (itself unless tied),
"act": "none"|"input"|"output", "act_bits": int}.

Everything that changes the computation is checksummed: the tensors, the header, and the config
(which must equal the header's copy, less the names fairseq's ``--model-overrides`` replace), so a
damaged file is refused, never loaded as another model. Version 1 files (tensors checksummed only)
still load, with a warning.
"""
import hashlib
import json
import logging
from typing import Dict

import torch
from omegaconf import OmegaConf

from ..checkpoint import load_state
from ..errors import QuantConfigError

logger = logging.getLogger(__name__)
FORMAT, VERSION = "fairseq-qpack", 2
HEADER_KEYS = ("format", "version", "layout", "sha256")


def tensors_sha256(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors, in key order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _without_keys(x, keys):
    if isinstance(x, dict):
        return {k: _without_keys(v, keys) for k, v in x.items() if k not in keys}
    return [_without_keys(v, keys) for v in x] if isinstance(x, list) else x


def header_sha256(header: dict) -> str:
    """sha256 of the canonical JSON of the header (with its copy of the config) less its checksums."""
    head = {k: v for k, v in header.items() if k not in ("sha256", "header_sha256")}
    return hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def same_config(cfg, original, overridden=()) -> bool:
    """Whether a loaded config equals the file's ``original`` but for ``overridden`` names (fairseq's
    ``arg_overrides`` replace them at any depth, as ``overwrite_args_by_name`` does)."""
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    return _without_keys(cfg, set(overridden)) == _without_keys(original, set(overridden))


def dictionary_checksum(*dictionaries) -> str:
    """sha256 of the symbols of fairseq Dictionaries, in index order (counts are ignored)."""
    h = hashlib.sha256()
    for d in dictionaries:
        h.update("\n".join(d.symbols).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def is_packed(state) -> bool:
    return isinstance(state, dict) and isinstance(state.get("qpack"), dict)


def claims_packed(state) -> bool:
    """Whether a loaded checkpoint's config names the packed architecture (with or without a header)."""
    cfg = state.get("cfg") if isinstance(state, dict) else None
    model = cfg.get("model") if isinstance(cfg, dict) or OmegaConf.is_config(cfg) else None
    get = (lambda k: model.get(k)) if isinstance(model, dict) or OmegaConf.is_config(model) else \
        (lambda k: getattr(model, k, None))
    return "transformer_packed" in (get("_name"), get("arch")) or get("qpack_layout") is not None


def validate_packed(state, path, overridden=()) -> None:
    """Raise QuantConfigError naming ``path`` if a loaded packed checkpoint is incomplete or corrupted.
    ``overridden``: config names replaced after loading (fairseq's ``arg_overrides``)."""
    header = state["qpack"]
    missing = [k for k in HEADER_KEYS if k not in header] + [k for k in ("cfg", "model") if k not in state]
    if missing:
        raise QuantConfigError(f"{path}: not a complete packed checkpoint (missing {missing}); the file is "
                               "corrupted: pack the source checkpoint again with fairseq-qpack")
    if header["format"] != FORMAT or header["version"] not in (1, 2):  # v1 loads with a warning
        raise QuantConfigError(f"{path}: packed format {header['format']!r} v{header['version']!r} is not "
                               f"{FORMAT} v{VERSION}; pack the source checkpoint again with this fairseq-qpack")
    model = state["model"]
    if not isinstance(model, dict) or not isinstance(header["layout"], dict):
        raise QuantConfigError(f"{path}: the packed checkpoint is corrupted (no tensor dict or layout)")
    absent = [f"{name}.wq" for name in header["layout"] if not any(k.startswith(name + ".wq.") for k in model)]
    if absent:
        raise QuantConfigError(f"{path}: packed weights missing for {absent[:5]}")
    if tensors_sha256(model) != header["sha256"]:
        raise QuantConfigError(f"{path}: the packed tensors do not match their checksum: the file is corrupted")
    if header["version"] == 1:
        logger.warning("%s: packed by an older fairseq-qpack (format v1): its config is not checksummed; pack the "
                       "source checkpoint again to protect it", path)
    elif header.get("header_sha256") != header_sha256(header) or not same_config(state["cfg"], header.get("config"),
                                                                                overridden):
        raise QuantConfigError(f"{path}: the packed checkpoint's config or header does not match its checksum: "
                               "the file is corrupted")


def load_packed(path) -> dict:
    """Load and validate a packed checkpoint with ``weights_only=True``; errors name the file."""
    state = load_state(path)
    if not is_packed(state):
        raise QuantConfigError(f"{path}: not a packed checkpoint (no 'qpack' header); create one with fairseq-qpack")
    validate_packed(state, path)
    return state


def layout_of(state) -> Dict[str, dict]:
    return json.loads(state["cfg"]["model"]["qpack_layout"])
