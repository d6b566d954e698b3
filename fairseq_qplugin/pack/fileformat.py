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
      "qpack": header {"format": "fairseq-qpack", "version": 1, "layout": {module: entry},
               "sha256": of every tensor's bytes in key order, "source": {...}, "report": {...}},
      "optimizer_history": [{... "num_updates": n}] (no optimizer state), "extra_state": {},
    }

A layout entry: {"kind": "linear"|"embedding", "method": "int"|"bcq"|"kmeans", "bits": int,
"shape": [rows, cols], "weight": the module whose tensors it uses (itself unless tied),
"act": "none"|"input"|"output", "act_bits": int}.
"""
import hashlib
import json
from typing import Dict

import torch

from ..errors import QuantConfigError

FORMAT, VERSION = "fairseq-qpack", 1
HEADER_KEYS = ("format", "version", "layout", "sha256")


def tensors_sha256(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors, in key order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dictionary_checksum(*dictionaries) -> str:
    """sha256 of the symbols of fairseq Dictionaries, in index order (counts are ignored)."""
    h = hashlib.sha256()
    for d in dictionaries:
        h.update("\n".join(d.symbols).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def is_packed(state) -> bool:
    return isinstance(state, dict) and isinstance(state.get("qpack"), dict)


def validate_packed(state, path) -> None:
    """Raise QuantConfigError naming ``path`` if a loaded packed checkpoint is incomplete or corrupted."""
    header = state["qpack"]
    missing = [k for k in HEADER_KEYS if k not in header] + [k for k in ("cfg", "model") if k not in state]
    if missing:
        raise QuantConfigError(f"{path}: not a complete packed checkpoint (missing {missing}); re-export it with fairseq-qpack")
    if header["format"] != FORMAT or header["version"] != VERSION:
        raise QuantConfigError(f"{path}: packed format {header['format']} v{header['version']} is not "
                               f"{FORMAT} v{VERSION}; re-export it with this version of fairseq-qpack")
    model = state["model"]
    absent = [f"{name}.wq" for name in header["layout"] if not any(k.startswith(name + ".wq.") for k in model)]
    if absent:
        raise QuantConfigError(f"{path}: packed weights missing for {absent[:5]}")
    if tensors_sha256(model) != header["sha256"]:
        raise QuantConfigError(f"{path}: the packed tensors do not match their checksum: the file is corrupted")


def load_packed(path) -> dict:
    """Load and validate a packed checkpoint with ``weights_only=True``; errors name the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise QuantConfigError(f"{path}: no such file") from None
    except Exception as e:  # truncated zip, bad pickle, ...
        raise QuantConfigError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {e}); "
                               "the file is truncated or corrupted") from None
    if not is_packed(state):
        raise QuantConfigError(f"{path}: not a packed checkpoint (no 'qpack' header); create one with fairseq-qpack")
    validate_packed(state, path)
    return state


def layout_of(state) -> Dict[str, dict]:
    return json.loads(state["cfg"]["model"]["qpack_layout"])
