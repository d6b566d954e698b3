"""Loading an exported model directory (``fairseq-qpack --export``) into the C++ engine.

Everything is checked before the engine sees it; each problem is one ``ModelError`` line naming the
file and what to do: a missing file, a config that is not this format, a truncated or corrupted
safetensors file, a tensor whose dtype / shape contradicts the config or whose bytes contradict the
config's sha256, dictionaries that are not the model's. No torch, no fairseq: numpy, safetensors and
ctypes (calls into the engine release the GIL).
"""
import ctypes
import hashlib
import json
import logging
import os
from typing import Dict, List

import numpy as np


logger = logging.getLogger("fairseq_qruntime")

FORMAT, VERSION = "fairseq-qruntime", 1
LUTS = ("auto", "fp32", "int16")  # arithmetic of the BCQ products (Model(lut=...)): int16 tables / GEMM or fp32
ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_accurate": 2, "gelu_fast": 2, "tanh": 3, "linear": 4}
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
_ERRLEN = 2048


class ModelError(Exception):
    """A model directory that cannot be used: the message says which file and why."""


class NativeUnavailable(ModelError):
    """The engine library is not built and cannot be built here."""


# --------------------------------------------------------------------------------------------
# The library.

_lib = None


def library_path() -> str:
    from .build import HERE, LIBNAME  # not at import: python -m fairseq_qruntime.build must run it first

    return os.environ.get("QRUNTIME_LIB") or os.path.join(HERE, LIBNAME)


def load_library(build_if_missing: bool = True):
    """The engine (ctypes.CDLL, which releases the GIL in every call), built first if needed."""
    global _lib
    if _lib is not None:
        return _lib
    path = library_path()
    if not os.path.isfile(path) or (not os.environ.get("QRUNTIME_LIB") and _stale(path)):
        if not build_if_missing:
            raise NativeUnavailable(f"{path}: the runtime engine is not built; run python -m fairseq_qruntime.build")
        try:
            from .build import build

            logger.info("building the runtime engine (%s)", path)
            build(path)
        except (RuntimeError, OSError) as e:
            raise NativeUnavailable(f"the runtime engine is not built and building it failed: {e}") from None
    lib = ctypes.CDLL(path)
    c, i, f, p, i64p = ctypes.c_char_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    lib.qr_model_new.restype = p
    lib.qr_model_free.argtypes = [p]
    lib.qr_model_spec.argtypes = [p, c, c, i]
    lib.qr_model_tensor.argtypes = [p, c, i, i, i64p, p, c, i]
    lib.qr_model_weight.argtypes = [p, c, c, c, i, i, i, c, i]
    lib.qr_model_act.argtypes = [p, c, i, f, f, i, c, i]
    lib.qr_model_finalize.argtypes = [p, c, i]
    lib.qr_model_finalize_weights.argtypes = [p, c, i]
    lib.qr_model_isa.argtypes = [p]
    lib.qr_model_isa.restype = c
    lib.qr_model_lut.argtypes = [p]
    lib.qr_model_lut.restype = c
    lib.qr_linear.argtypes = [p, c, p, i, p, i, c, i]
    lib.qr_score.argtypes = [p, p, p, i, p, i, i, p, c, i]
    lib.qr_translate.argtypes = [p, p, p, i, i, i, f, ctypes.c_double, i, i, f, i, ctypes.POINTER(p), c, i]
    lib.qr_result_counts.argtypes = [p, i, p]
    lib.qr_result_copy.argtypes = [p, i, p, p]
    lib.qr_result_free.argtypes = [p]
    _lib = lib
    return lib


def _stale(path: str) -> bool:
    """Whether the engine's sources (when present, as in a checkout or an install) differ from those
    the library was built from (their sha256, written by build.py next to it; none: unknown, stale)."""
    from .build import source_digest, stamp_path

    digest = source_digest()
    if not digest:
        return False
    try:
        with open(stamp_path(path)) as f:
            return f.read().strip() != digest
    except OSError:
        return True


def _call(fn, *args):
    err = ctypes.create_string_buffer(_ERRLEN)
    if fn(*args, err, _ERRLEN) != 0:
        raise ModelError(err.value.decode("utf-8", "replace"))


# --------------------------------------------------------------------------------------------
# Dictionaries (fairseq's Dictionary file format and index rules).

class Dictionary:
    def __init__(self, path: str):
        self.symbols: List[str] = list(SPECIALS)
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if line.endswith(" #fairseq:overwrite"):
                    line = line[: -len(" #fairseq:overwrite")]
                word, sep, count = line.rpartition(" ")
                if not sep or not count.lstrip("-").isdigit():
                    raise ModelError(f"{path}:{n}: not a fairseq dictionary line ('<symbol> <count>')")
                self.symbols.append(word)
        self.index: Dict[str, int] = {}
        for i, s in enumerate(self.symbols):
            self.index.setdefault(s, i)
        self.bos, self.pad, self.eos, self.unk = 0, 1, 2, 3

    def __len__(self):
        return len(self.symbols)

    def encode(self, line: str) -> List[int]:
        """Token ids of a whitespace-tokenized line, unknown symbols as unk, then EOS (encode_line)."""
        return [self.index.get(w, self.unk) for w in line.split()] + [self.eos]

    def string(self, ids) -> str:
        return " ".join(self.symbols[i] for i in ids if i not in (self.bos, self.eos))


def dictionary_checksum(*dictionaries: Dictionary) -> str:
    """The checksum fairseq-qpack records (pack/fileformat.py dictionary_checksum)."""
    h = hashlib.sha256()
    for d in dictionaries:
        h.update("\n".join(d.symbols).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def tensors_sha256(tensors: Dict[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order (fairseq-qpack --export writes it)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{a.dtype.name}|{list(a.shape)}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# The model.

class Model:
    """An exported model loaded into the engine; immutable, shared by any number of threads."""

    def __init__(self, model_dir: str, lut: str = "auto"):
        """``lut``: the arithmetic of the BCQ products: "int16" (lookup tables for few rows, a GEMM for many;
        faster, within the error bound of docs/runtime.md; needs AVX-512 VBMI and VNNI and no activation
        quantization, else fp32 with a warning), "fp32" (exact: the products of fairseq-generate) or "auto"
        (the default: int16 where it runs, else fp32)."""
        if lut not in LUTS:
            raise ValueError(f"lut must be one of {', '.join(LUTS)}, got {lut!r}")
        self.dir = model_dir
        self._lut_request = lut
        lib = load_library()
        cfg = self.config = self._read_config()
        dcfg = cfg["dictionaries"]
        self.src_dict = Dictionary(self._file(dcfg["source"]))
        self.tgt_dict = Dictionary(self._file(dcfg["target"]))
        self._check_dictionaries()
        arrays = self._read_tensors()
        self._arrays = arrays  # the engine reads these buffers: they live as long as the model
        self._ptr = lib.qr_model_new()
        self._lib = lib
        try:
            self._build(lib, arrays)
        except ModelError as e:
            raise ModelError(f"{model_dir}: {e}") from None
        self.isa = lib.qr_model_isa(self._ptr).decode()
        self.lut = lib.qr_model_lut(self._ptr).decode()
        if lut == "int16" and self.lut != lut:
            logger.warning("int16 products need AVX-512 VBMI and VNNI (this CPU, kernels %s) and a model "
                           "without activation quantization: using fp32", self.isa)
        self.max_source_positions = int(cfg["encoder"]["max_positions"])

    def __del__(self):
        if getattr(self, "_ptr", None):
            self._lib.qr_model_free(self._ptr)
            self._ptr = None

    def _file(self, name: str) -> str:
        path = os.path.join(self.dir, name)
        if not os.path.isfile(path):
            raise ModelError(f"{path}: missing; the model directory is incomplete (re-export it with "
                             "fairseq-qpack --export DIR PACKED.pt)")
        return path

    def _read_config(self) -> dict:
        if not os.path.isdir(self.dir):
            raise ModelError(f"{self.dir}: no such model directory (create one with "
                             "fairseq-qpack --export DIR PACKED.pt)")
        path = self._file("config.json")
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelError(f"{path}: not valid JSON ({e}); re-export the model") from None
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or cfg.get("version") != VERSION:
            raise ModelError(f"{path}: not a {FORMAT} v{VERSION} config; re-export the model with this version")
        keys = ("encoder", "decoder", "modules", "tensors", "sha256", "dictionaries", "symbols", "weights")
        missing = [k for k in keys if k not in cfg]
        if missing:
            raise ModelError(f"{path}: config lacks {missing}; re-export the model")
        if cfg.get("activation", "relu") not in ACTIVATIONS:
            raise ModelError(f"{path}: activation {cfg.get('activation')!r} is not supported")
        return cfg

    def _check_dictionaries(self):
        cfg = self.config
        found = dictionary_checksum(self.src_dict, self.tgt_dict)
        if found != cfg["dictionaries"]["checksum"]:
            raise ModelError(f"{os.path.join(self.dir, cfg['dictionaries']['source'])}: the dictionaries "
                             f"(checksum {found}, {len(self.src_dict)}/{len(self.tgt_dict)} symbols) are not the model's "
                             f"({cfg['dictionaries']['checksum']}); use the dictionaries exported with the model")
        for d, side in ((self.src_dict, "encoder"), (self.tgt_dict, "decoder")):
            if len(d) != cfg[side]["vocab"]:
                raise ModelError(f"{self.dir}: the {side} dictionary has {len(d)} symbols, "
                                 f"the model {cfg[side]['vocab']}")

    def _read_tensors(self) -> Dict[str, np.ndarray]:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        cfg = self.config
        path = self._file(cfg["weights"])
        try:
            raw = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot be read ({e}); the file is truncated or corrupted: "
                             "re-export the model") from None
        want = cfg["tensors"]
        missing, extra = sorted(set(want) - set(raw)), sorted(set(raw) - set(want))
        if missing or extra:
            raise ModelError(f"{path}: tensors do not match config.json "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for name, spec in want.items():
            a = raw[name]
            if a.dtype.name != spec["dtype"] or list(a.shape) != list(spec["shape"]):
                raise ModelError(f"{path}: tensor {name} is {a.dtype.name} {list(a.shape)}, config.json says "
                                 f"{spec['dtype']} {spec['shape']}; re-export the model")
        if tensors_sha256(raw) != cfg["sha256"]:
            raise ModelError(f"{path}: the tensors do not match the sha256 in config.json: the file is corrupted "
                             "or was changed; re-export the model")
        for name, e in cfg["modules"].items():
            for field, t in e["tensors"].items():
                if t not in want:
                    raise ModelError(f"{self.dir}/config.json: module {name} names tensor {t}, which is not stored")
            if e["format"] in ("fp16", "fp32"):
                spec = want[e["tensors"]["weight"]]
                dtype = {"fp16": "float16", "fp32": "float32"}[e["format"]]
                if list(spec["shape"]) != list(e["shape"]) or spec["dtype"] != dtype:
                    raise ModelError(f"{path}: tensor {e['tensors']['weight']} is {spec['dtype']} {spec['shape']}, "
                                     f"but module {name} is {e['format']} {e['shape']} in config.json; "
                                     "re-export the model")
        out = {}
        for name, a in raw.items():
            if a.dtype == np.float16 or a.dtype == np.float32:
                a = a.astype(np.float32)
            elif a.dtype != np.uint8:
                raise ModelError(f"{path}: tensor {name} has dtype {a.dtype}; the runtime reads float16/float32/uint8")
            out[name] = np.ascontiguousarray(a)
        return out

    def _spec(self) -> str:
        cfg, sym = self.config, self.config["symbols"]
        kv = {"pad": sym["pad"], "eos": sym["eos"], "unk": sym["unk"], "bos": sym["bos"],
              "activation": ACTIVATIONS[cfg.get("activation", "relu")]}
        for side in ("encoder", "decoder"):
            s = cfg[side]
            for k in ("layers", "dim", "ffn", "heads", "max_positions", "vocab"):
                kv[f"{side}.{k}"] = int(s[k])
            for k in ("normalize_before", "positions", "learned_pos"):
                kv[f"{side}.{k}"] = int(bool(s[k]))
            kv[f"{side}.embed_scale"] = repr(float(s["embed_scale"]))
            kv[f"{side}.attn_scaling"] = repr(float(s["attn_scaling"]))
        kv["lut_int16"] = int(self._lut_request != "fp32")
        return " ".join(f"{k}={v}" for k, v in kv.items())

    def _build(self, lib, arrays):
        p = self._ptr
        _call(lib.qr_model_spec, p, self._spec().encode())
        for name, a in arrays.items():
            shape = (ctypes.c_int64 * a.ndim)(*a.shape)
            _call(lib.qr_model_tensor, p, name.encode(), 0 if a.dtype == np.float32 else 1, a.ndim, shape,
                  a.ctypes.data_as(ctypes.c_void_p))
        modules = self.config["modules"]
        # owners first, so that tied modules find their owner's weight
        for name in sorted(modules, key=lambda n: modules[n]["weight"] != n):
            e = modules[name]
            fmt = "dense" if e["format"] in ("fp16", "fp32") else e["format"]
            rows, cols = e["shape"]
            _call(lib.qr_model_weight, p, name.encode(), e["weight"].encode(), fmt.encode(), int(e["bits"]), rows, cols)
            if e.get("act", "none") != "none":
                _call(lib.qr_model_act, p, name.encode(), 1 if e["act"] == "input" else 2, float(e["act_scale"]),
                      float(e["act_zero_point"]), int(e["act_bits"]))
        _call(lib.qr_model_finalize, p)

    # ---- calls (each releases the GIL)

    def linear(self, module: str, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """x [n, cols] @ W^T of one module (its bias left out) as translation computes it: [n, rows] float32."""
        e = self.config["modules"].get(module)
        if e is None:
            raise ModelError(f"{self.dir}: no module {module!r}")
        rows, cols = e["shape"]
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != cols:
            raise ValueError(f"{module}: x must be [n, {cols}], got {list(x.shape)}")
        out = np.empty((x.shape[0], rows), dtype=np.float32)
        _call(self._lib.qr_linear, self._ptr, module.encode(), x.ctypes.data, x.shape[0], out.ctypes.data, threads)
        return out

    def score(self, src: List[List[int]], prev: np.ndarray, threads: int = 1) -> np.ndarray:
        """Teacher-forced decoder logits float32 [bsz, tgt_len, vocab] for prev int [bsz, tgt_len]."""
        flat = np.ascontiguousarray(np.concatenate([np.asarray(s, dtype=np.int32) for s in src]))
        lens = np.asarray([len(s) for s in src], dtype=np.int32)
        prev = np.ascontiguousarray(prev, dtype=np.int32)
        out = np.empty((len(src), prev.shape[1], len(self.tgt_dict)), dtype=np.float32)
        _call(self._lib.qr_score, self._ptr, flat.ctypes.data, lens.ctypes.data, len(src), prev.ctypes.data,
              prev.shape[1], threads, out.ctypes.data)
        return out

    def generate(self, src: List[List[int]], beam=5, nbest=1, lenpen=1.0, max_len_a=0.0, max_len_b=200, min_len=1,
                 unk_penalty=0.0, threads=1):
        """[[(token ids without EOS, score)] * nbest] per source sentence (each ending with EOS)."""
        flat = np.ascontiguousarray(np.concatenate([np.asarray(s, dtype=np.int32) for s in src]))
        lens = np.asarray([len(s) for s in src], dtype=np.int32)
        res = ctypes.c_void_p()
        _call(self._lib.qr_translate, self._ptr, flat.ctypes.data, lens.ctypes.data, len(src), beam, nbest, lenpen,
              max_len_a, max_len_b, min_len, unk_penalty, threads, ctypes.byref(res))
        try:
            counts = np.empty(len(src) * nbest, dtype=np.int32)
            self._lib.qr_result_counts(res, nbest, counts.ctypes.data)
            toks = np.empty(max(1, int(counts[counts > 0].sum())), dtype=np.int32)
            scores = np.empty(len(src) * nbest, dtype=np.float32)
            self._lib.qr_result_copy(res, nbest, toks.ctypes.data, scores.ctypes.data)
        finally:
            self._lib.qr_result_free(res)
        out, k = [], 0
        for b in range(len(src)):
            hyps = []
            for j in range(nbest):
                c = int(counts[b * nbest + j])
                if c >= 0:
                    hyps.append((toks[k:k + c].tolist(), float(scores[b * nbest + j])))
                    k += c
            out.append(hyps)
        return out


class BcqLayer:
    """One packed BCQ weight in the engine, without a model around it (tests and benchmarks of single
    layers): planes uint8 [q, rows, ceil(cols / 8)] and alpha float32 [q, rows or 1, groups] as in an
    exported model; ``linear(x)`` is ``Model.linear`` of such a module."""

    def __init__(self, planes: np.ndarray, alpha: np.ndarray, cols: int, lut: str = "auto"):
        if lut not in LUTS:
            raise ValueError(f"lut must be one of {', '.join(LUTS)}, got {lut!r}")
        lib = self._lib = load_library()
        self._arrays = {"w.wq.planes": np.ascontiguousarray(planes, dtype=np.uint8),
                        "w.wq.alpha": np.ascontiguousarray(alpha, dtype=np.float32)}
        self.rows, self.cols = int(planes.shape[1]), cols
        self._ptr = lib.qr_model_new()
        _call(lib.qr_model_spec, self._ptr, f"lut_int16={int(lut != 'fp32')}".encode())
        for name, a in self._arrays.items():
            shape = (ctypes.c_int64 * a.ndim)(*a.shape)
            _call(lib.qr_model_tensor, self._ptr, name.encode(), 0 if a.dtype == np.float32 else 1, a.ndim, shape,
                  a.ctypes.data_as(ctypes.c_void_p))
        _call(lib.qr_model_weight, self._ptr, b"w", b"w", b"bcq", int(planes.shape[0]), self.rows, cols)
        _call(lib.qr_model_finalize_weights, self._ptr)
        self.lut = lib.qr_model_lut(self._ptr).decode()

    def __del__(self):
        if getattr(self, "_ptr", None):
            self._lib.qr_model_free(self._ptr)
            self._ptr = None

    def linear(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.cols:
            raise ValueError(f"x must be [n, {self.cols}], got {list(x.shape)}")
        out = np.empty((x.shape[0], self.rows), dtype=np.float32)
        _call(self._lib.qr_linear, self._ptr, b"w", x.ctypes.data, x.shape[0], out.ctypes.data, threads)
        return out
