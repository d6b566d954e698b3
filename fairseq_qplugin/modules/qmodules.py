"""Quantized drop-in modules: one linear, one embedding, and the weight / activation fake-quantizers.

The modules keep fairseq's parameter names (``weight``, ``bias``), so a plain ``transformer``
state dict loads into them and theirs loads into a plain ``transformer``. ``weight`` is the latent
full-precision tensor; the forward pass uses its quantized value.

Checkpoint schema of a quantized module ``M`` (``_QuantizedWeightMixin``):

- ``M.weight``: the quantized value (a saved checkpoint *is* the quantized model, loadable by a plain
  ``transformer``);
- ``M.wq.code.<field>``: the code, bit-packed as in the packed file (quant/packed.py; float
  parameters in fp32), so ``fairseq-qpack`` and a resumed run read it instead of searching again;
- ``M.wq.latent``: the latent weight where it differs from ``M.weight`` (straight-through training;
  in pNR mode the save-time sync makes them equal), so a resumed run continues bit for bit;
- ``M.wq.spec``: the quantizer's signature (utf-8 bytes); a model loads the code and latent only of
  its own signature, and ``drop_unusable_state`` drops those of another method or configuration
  (with one log line): the model then starts from ``M.weight``, as a checkpoint without them does;
- the quantizer's own state (k-means codebooks, pruning masks: modules/kmeans.py) under ``M.wq.*``,
  except what the code holds (k-means indices and masks are saved once, bit-packed in ``code.*``).
"""
import hashlib
import logging
from contextlib import contextmanager, suppress
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import global_range
from ..quant import (PackedWeight, QuantizedWeight, QuantSpec, fake_quantize_range, pack_weight, packed_from_dict,
                     quantize, quantize_bcq_rows, resolve, storage_bits, straight_through)
from ..quant.base import binarize_gate

logger = logging.getLogger(__name__)


class WeightQuantizer(nn.Module):
    """The quantizer protocol: maps a latent weight to its code and its fake-quantized value.

    A method implements ``search(w)`` (the QuantizedWeight of a latent weight: ``quantize`` by
    default) and, where its training differs from straight-through fake quantization,
    ``train_value(w)``; ``storage_state()`` gives ``quant.storage_bits`` what the shape does not
    (row bits, kept weights). The base class caches the code per weight version (``quantized``),
    takes it from a checkpoint instead where one is saved (``load_code``), and handles evaluation,
    pNR and the checkpoint schema for every method.

    BCQ searches start from the scales of an earlier code (``_warm``; ``quantize_bcq``'s ``init_alpha``).
    In straight-through training that is the code of the last training forward of the model
    (``quantize_once_per_forward``), from which the search starts alone (``fresh=False``) at 3 and 4
    bits: the alternating rounds of successive updates add up, for the cost of one search (3 bits, the
    weights of a converged 3+3-layer model held fixed: 5 warm searches of 2 rounds reach the relative
    error of one 100-round search, 0.186; one fresh 2-round search: 0.203). At 1-2 bits each search is
    fresh (docs/bcq.md says why). In pNR (below): the last sync's code.

    Without gradients (validation, generation) the quantized weight is cached until the latent
    weight or the quantizer's own tensors change (in-place version counters). In training it is
    computed once per forward pass inside ``quantize_once_per_forward`` (a model's training forward),
    however many modules use it (tied embeddings and output projection), and at every use outside it.

    ``pnr`` (set by the pNR optimizer wrapper, ``optim/pnr.py``): the training forward uses the
    latent weight as is, in full precision; ``sync_`` replaces it in place by its quantized value.
    Evaluation and ``state_dict`` still see the quantized weight. A BCQ search warm-starts from the
    last sync's code (its scales: ``quantize_bcq``'s ``init_alpha``), so a sync never moves the weight
    farther than the distance to that code, and a resumed run (whose weights and codes are the
    saved ones) continues from the same ones.

    ``trains_latent = False`` freezes the latent weight (it gets no gradient).

    ``row_bits`` (optional, int8 [rows] in 1..spec.bits): BCQ with its own bit count per row
    (frequency-mixed embeddings and output projections, ``RowBitsQuantizer``); a non-persistent
    buffer, rebuilt from the dictionary. Its straight-through gradient is the identity.
    """

    trains_latent = True

    def __init__(self, spec: QuantSpec, row_bits: Optional[torch.Tensor] = None):
        super().__init__()
        self.spec = spec
        self.register_buffer("row_bits", None if row_bits is None else row_bits.to(torch.int8), persistent=False)
        self.pnr = False
        self._cache = None  # (key, fake-quantized value) for evaluation
        self._code = None  # (key, QuantizedWeight): the code of the weight at key, searched or loaded; None after
        # a training forward: an update (through w.data, which keeps w's version) may have changed w
        self._saved = None  # (key, checkpoint entries): shared by the names of a tied weight
        self._synced = None  # (data pointer, version) of the weight right after its last sync
        self._warm = None  # bcq: the scales the next search starts from (pNR: the last sync's code's)
        self._latest = None  # straight-through bcq: the scales of the latest code, _warm after a training forward
        self._per_forward = None  # inside quantize_once_per_forward: {weight data pointer: quantized value}
        self._ready = True  # False while a method's state is not built yet (modules/kmeans.py): nothing to save

    # -- what a method implements ----------------------------------------------------------------
    def search(self, w: torch.Tensor) -> QuantizedWeight:
        if self.row_bits is not None:
            return quantize_bcq_rows(w.detach(), self.row_bits, self.spec, self._warm, fresh=self.pnr)
        return quantize(w.detach(), self.spec, self._warm, fresh=self.pnr)

    def train_value(self, w: torch.Tensor) -> torch.Tensor:
        """The training forward's value: straight-through fake quantization."""
        return straight_through(w, self.once_per_forward(w, lambda: self.quantized(w).dequantize().to(w.dtype)),
                                self.gate(w))

    def once_per_forward(self, w: torch.Tensor, make) -> torch.Tensor:
        """``make()``, the quantized value of ``w``: computed once per forward pass inside
        ``quantize_once_per_forward`` (a weight tied to several modules), else at every call."""
        memo = self._per_forward
        if memo is None:
            return make()
        if w.data_ptr() not in memo:
            memo[w.data_ptr()] = make()
        return memo[w.data_ptr()]

    def gate(self, w: torch.Tensor) -> Optional[torch.Tensor]:
        """Where the straight-through gradient passes (None: everywhere): |w| <= 1 at 1 bit (Eq. 7)."""
        return binarize_gate(w, self.spec) if self.row_bits is None else None

    def storage_state(self) -> dict:
        return {} if self.row_bits is None else {"row_bits": self.row_bits}

    def prepare(self, w: torch.Tensor):
        """Before a training forward (no gradient): state changes due at this update (pruning, clustering)."""

    def is_training_forward(self, w: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and w.requires_grad

    # -- the rest of the plugin reads these --------------------------------------------------------
    def key(self, w: torch.Tensor):
        return (w.data_ptr(), w._version, *(t._version for t in (*self.parameters(), *self.buffers())))

    def quantized(self, w: torch.Tensor) -> QuantizedWeight:
        """The code (codes and parameters) of a 2-D tensor: what the packed export stores."""
        key = self.key(w)
        if self._code is None or self._code[0] != key:
            self._code = (key, self.search(w))
        if isinstance(self._code[1], PackedWeight):  # a loaded code, unpacked on first use
            qw = self._code[1].unpack()
            qw.packed_fp32 = self._code[1]
            self._code = (key, qw)
        if self.spec.method == "bcq" and not self.pnr:  # straight-through: the next update's search starts here
            self._latest = self._code[1].alpha
        return self._code[1]

    def packed(self, w: torch.Tensor) -> PackedWeight:
        """``pack_weight(self.quantized(w), fp32)``: the loaded packed code as it is, if ``w`` is the loaded weight."""
        code = self._code
        if code is not None and code[0] == self.key(w) and isinstance(code[1], PackedWeight):
            return code[1]
        return pack_weight(self.quantized(w), torch.float32)

    def average_bits(self) -> float:
        """Bits per weight of the codes alone (without scales)."""
        return float(self.spec.bits) if self.row_bits is None else self.row_bits.float().mean().item()

    def storage_bits(self, w: torch.Tensor) -> int:
        """The packed size of ``w``'s code in bits (``quant.storage_bits``: from the shape, no search)."""
        return storage_bits(self.spec, w.shape, **self.storage_state())

    def state_dict_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The value saved as the module's ``weight`` in state dicts: the quantized weight."""
        return self(w)

    def signature(self) -> str:
        signature = f"{type(self).__name__}({self.spec})"
        if self.row_bits is not None:
            signature += f", row bits {hashlib.sha256(self.row_bits.cpu().numpy().tobytes()).hexdigest()[:16]}"
        return signature

    def code_method(self) -> str:
        return "bcq_mixed" if self.row_bits is not None else resolve(self.spec).method

    def fits(self, spec: Optional[torch.Tensor]) -> bool:
        """Whether a checkpoint's ``wq.spec`` entry is this quantizer's signature (its code and latent weight fit)."""
        return spec is not None and bytes(spec.tolist()).decode(errors="replace") == self.signature()

    def checkpoint_entries(self, w: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The saved ``weight`` and the ``spec``, ``code.<field>`` and ``latent`` entries of the checkpoint
        schema (module doc) of the latent weight ``w``; the same tensors for every name of a tied weight."""
        key = self.key(w)
        if self._saved is None or self._saved[0] != key:
            view = self.state_dict_weight(w)
            entries = {"spec": torch.tensor(list(self.signature().encode()), dtype=torch.uint8)}
            if self._ready:
                with suppress(ValueError):  # no packed format (pruning alone): the weight stays float
                    entries.update({f"code.{k}": v for k, v in self.packed(w).as_dict().items()})
            if not self.pnr and not torch.equal(view, w):
                entries["latent"] = w.clone()
            self._saved = (self.key(w), (view.clone(), entries))
        return self._saved[1]

    def load_code(self, w: torch.Tensor, fields: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Take the saved code of the loaded weight ``w`` (its signature checked by ``drop_unusable_state``);
        return the quantizer's own state that only the code holds (k-means indices, pruning masks), to load."""
        self._code = (self.key(w), packed_from_dict(self.code_method(), fields))
        return {}

    # -- forward and pNR ---------------------------------------------------------------------------
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.is_training_forward(w):
            self._cache = self._synced = self._saved = None  # a training step follows (which may update w
            with torch.no_grad():  # through w.data, keeping its version): the code is stale after this forward
                self.prepare(w.detach())
            if not self.pnr:
                out = self.train_value(w)
            elif self._warm is None and self.spec.method == "bcq":
                self._warm = self.quantized(w).alpha  # of the starting weight's code (the saved one after a resume)
            self._code = None
            return w if self.pnr else out
        with torch.no_grad():
            key = self.key(w)
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, self.quantized(w).dequantize().to(w.dtype))
        return self._cache[1]

    @torch.no_grad()
    def sync_(self, w: torch.Tensor):
        """pNR projection: overwrite ``w`` with its quantized value (which is then also the cached one).
        A weight left unchanged since its last sync (no training forward, same version) is skipped."""
        if self._synced == (w.data_ptr(), w._version):
            return
        qw = self.quantized(w)
        w.copy_(qw.dequantize().to(w.dtype))
        if self._warm is not None:  # a bcq quantizer in pNR mode, set up by its first training forward
            self._warm = qw.alpha
        self._synced = (w.data_ptr(), w._version)
        self._code = (self.key(w), qw)
        self._cache = (self.key(w), w.detach())

    def extra_repr(self):
        s = self.spec
        if s.method == "bcq":
            kind = f"bcq, bits={s.bits}, granularity={s.granularity}, search={s.search}"
            kind += f", group_size={s.group_size}" if s.group_size else ""
        else:
            kind = f"{s.method}, bits={s.bits}, scheme={s.scheme}, granularity={s.granularity}"
        if self.row_bits is not None:
            counts = torch.bincount(self.row_bits.long(), minlength=s.bits + 1).tolist()
            per_bits = ", ".join(f"{n}x{b}" for b, n in reversed(list(enumerate(counts))) if n)
            kind += f", rows at bits: {per_bits} ({self.average_bits():.2f} average)"
        return kind + (", pnr" if self.pnr else "")


class RowBitsQuantizer(WeightQuantizer):
    """BCQ with its own bit count per row (``row_bits``, int8 [rows] in 1..spec.bits; see WeightQuantizer)."""

    def __init__(self, spec: QuantSpec, row_bits: torch.Tensor):
        super().__init__(spec, row_bits)


QUANTIZER_ATTR = "qplugin_quantizer"


def quantizer_of(param: torch.Tensor) -> Optional[WeightQuantizer]:
    """The WeightQuantizer of a quantized module's weight Parameter, or None.

    QuantLinear and QuantEmbedding tag their weight Parameter with its quantizer (like fairseq's
    ``param.param_group`` tags), so code that only sees parameters, such as an optimizer, can
    reach it.
    """
    return getattr(param, QUANTIZER_ATTR, None)


@torch.no_grad()
def sync_pnr_weights_(params) -> int:
    """Replace every pNR-mode quantized weight among ``params`` by its quantized value; return how many."""
    synced = [p for p in params if quantizer_of(p) is not None and quantizer_of(p).pnr]
    for p in synced:
        quantizer_of(p).sync_(p)
    return len(synced)


@contextmanager
def quantize_once_per_forward(module: nn.Module):
    """For one training forward pass of ``module``: each of its weight quantizers quantizes its weight
    once and reuses the value (a weight tied between the embeddings and the output projection is
    otherwise quantized three times). The weights change at the next update, so only one pass.
    Straight-through BCQ searches of the next pass start from this pass's codes."""
    quantizers = [m for m in module.modules() if isinstance(m, WeightQuantizer)]
    for wq in quantizers:
        wq._per_forward = {}
    try:
        yield
    finally:
        for wq in quantizers:
            wq._per_forward = None
            if wq._latest is not None and not wq.pnr:  # straight-through bcq (class doc)
                wq._warm = wq._latest


class ActQuantizer(nn.Module):
    """Fake-quantizes activations to ``bits`` on a running [min, max] range (exponential average).

    The range is learned in training; a model that never trained with it (e.g. fine-tuned from a
    plain checkpoint and evaluated at once) uses each batch's own range. In data-parallel training
    a training batch's range is all-reduced over the ranks (one tiny all-reduce per quantizer and
    forward), so every rank holds the same range: the combined batch's.
    """

    rebuilt_state = ("running_min", "running_max", "initialized")  # a checkpoint may lack them (models/base.py)

    def __init__(self, bits: int, momentum: float = 0.95):
        super().__init__()
        self.bits, self.momentum = bits, momentum
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        if self.training:
            lo, hi = global_range(lo, hi)
            if self.initialized:
                m = self.momentum
                lo = self.running_min * m + lo * (1 - m)
                hi = self.running_max * m + hi * (1 - m)
            self.running_min.copy_(lo)
            self.running_max.copy_(hi)
            self.initialized.fill_(True)
        elif self.initialized:
            lo, hi = self.running_min, self.running_max
        return fake_quantize_range(x, lo, hi, self.bits)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """A checkpoint trained without activation quantization has no range yet: start without one."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        missing[:] = [k for k in missing if k not in {prefix + n for n in self.rebuilt_state}]

    def extra_repr(self):
        return f"bits={self.bits}"


def is_schema_key(key: str) -> bool:
    """Whether ``key`` is a ``<module>.wq.spec / latent / code.*`` entry of the checkpoint schema."""
    _, sep, rest = ("." + key).rpartition(".wq.")
    return bool(sep) and (rest in ("spec", "latent") or rest.startswith("code."))


class _QuantizedWeightMixin:
    """Forward uses ``self.wq(self.weight)``; ``state_dict`` saves the checkpoint schema (module doc)."""

    def _attach(self, wq: WeightQuantizer):
        self.wq = wq
        setattr(self.weight, QUANTIZER_ATTR, wq)

    def quantized_weight(self) -> torch.Tensor:
        return self.wq(self.weight)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """``keep_vars`` (the keys and Parameters only, as ``check_compatible`` asks): nothing is quantized."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars:
            with torch.no_grad():
                view, entries = self.wq.checkpoint_entries(self.weight.detach())
            destination[prefix + "weight"] = view
            destination.update({f"{prefix}wq.{k}": v for k, v in entries.items()})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """The latent weight where saved, then the saved code, if they are this quantizer's (``wq.spec``)."""
        saved = {k[len(prefix) + 3:]: state_dict.pop(k) for k in list(state_dict)
                 if k.startswith(prefix + "wq.") and is_schema_key(k)}
        if not self.wq.fits(saved.get("spec")):  # another quantizer's: start from the quantized weight
            saved = {}
        latent = saved.pop("latent", None)
        if latent is not None and prefix + "weight" in state_dict:
            state_dict[prefix + "weight"] = latent
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        code = {k[5:]: v for k, v in saved.items() if k.startswith("code.")}
        if code and prefix + "weight" in state_dict:  # the quantizer (a child module) loads after this
            for name, t in self.wq.load_code(self.weight.detach(), code).items():
                state_dict.setdefault(f"{prefix}wq.{name}", t)


def drop_unusable_state(model: nn.Module, state_dict: dict) -> dict:
    """``state_dict`` without the quantizer entries (``<module>.wq.*``) that ``model`` cannot use: all of them
    for a model without that quantizer (a plain ``transformer``, a part left in float), and the
    saved code and latent weight of another method or configuration (another ``wq.spec``), or state the
    module's quantizer does not have. One info line says what was dropped; the quantized ``weight``
    values then start the model, as from a checkpoint without codes."""
    modules = dict(model.named_modules(remove_duplicate=False))

    def usable(key):
        name, _, rest = key.rpartition(".wq.")
        wq = modules.get(name + ".wq")
        if wq is None:
            return False
        if isinstance(modules[name], _QuantizedWeightMixin) and is_schema_key(key):
            return wq.fits(state_dict.get(f"{name}.wq.spec"))
        return rest.split(".")[0] in {*wq._parameters, *wq._buffers, *wq._modules}

    dropped = {k for k in state_dict if ".wq." in k and not usable(k)}
    if dropped:
        logger.info("loading a checkpoint of another quantization method or configuration: dropped its %d "
                    "quantizer entries this model cannot use (e.g. %s); the saved quantized weights start it",
                    len(dropped), min(dropped))
    return {k: v for k, v in state_dict.items() if k not in dropped}


class QuantLinear(_QuantizedWeightMixin, nn.Module):
    """``nn.Linear`` with a quantized weight and optionally quantized input or output activations.

    Built from an existing ``nn.Linear`` whose Parameter objects it reuses (so weight ties survive).
    ``wq`` may be shared with a tied embedding so that both use one quantized matrix.
    """

    def __init__(self, linear: nn.Linear, wq: WeightQuantizer, act_in: Optional[ActQuantizer] = None,
                 act_out: Optional[ActQuantizer] = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.act_in, self.act_out = act_in, act_out
        self._attach(wq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_in is not None:
            x = self.act_in(x)
        y = F.linear(x, self.quantized_weight(), self.bias)
        return self.act_out(y) if self.act_out is not None else y

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantEmbedding(_QuantizedWeightMixin, nn.Module):
    """``nn.Embedding`` whose lookup table is quantized (one scale per row = per word)."""

    def __init__(self, embedding: nn.Embedding, wq: WeightQuantizer):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight = embedding.weight
        self._attach(wq)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.quantized_weight(), self.padding_idx)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"
