"""Weight quantizers for k-means weight sharing, BS-Flex and iterative magnitude pruning (docs/methods.md §2).

They implement the ``WeightQuantizer`` protocol (``search``: the code of their current state;
``train_value``; ``prepare``: pruning and clustering due at an update) and keep its checkpoint
schema: the module's ``weight`` is the latent fp32 tensor and its state-dict entry is the quantized
value, so a plain ``transformer`` checkpoint loads into them and theirs is the quantized model. Their
own state (codebook, indices, mask) is saved next to it under ``<module>.wq.*``, the indices and mask
only once, bit-packed in the saved code (``wq.code.*``, ``code_state``); a checkpoint without it (a
plain one, or another method's) is accepted and the state is rebuilt from the loaded weight (pruned
weights are saved as 0, so magnitude pruning finds the same mask again).

- ``KMeansQuantizer``: ``w_hat = (centroids + centroid_delta)[indices] * mask``. Assignments stay
  fixed; ``centroid_delta`` is the trained Parameter, so a centroid's gradient is the sum of its
  members' gradients (the poster's retraining). The clustering itself is written only into
  buffers, never into a Parameter, so it is safe under any optimizer wrapper (fp16 master copies).
  The latent weight is frozen, unless periodic re-clustering is on: then it also trains
  (straight-through), takes its nearest centroid at every update, and every N updates it is
  clustered again (Lloyd, warm-started from the codebook).
- ``BSFlexQuantizer``: 1 bit, two centroids per tensor or row; each update every weight takes its
  nearer centroid and the centroids become the means of their members, so weights change cluster
  as the latent weight (straight-through) moves. ``fixed=True`` keeps the initial centroids (the
  original scheme the poster compares with): then a weight's cluster follows its own value only.
- ``PruneQuantizer``: pruning alone, ``w_hat = w * mask``.

All three prune by magnitude following a ``PruneSchedule`` (the mask is a buffer; pruned weights are
exactly 0 in every forward, get no gradient, and are saved as 0), each tensor by its own ranking or,
with ``global_ranking``, by the model's one threshold over all pruned weights (``set_mask``). Work
that changes the state (pruning, clustering, re-clustering) happens in a training forward, after
fairseq has announced the update through ``set_num_updates``; clustering also happens on first use
if nothing was loaded.
"""
import logging
import time
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..quant import (KMeansWeight, PruneSchedule, QuantSpec, SparseWeight, bsflex_init, bsflex_step, kmeans_weight,
                     packed_from_dict, straight_through)
from ..quant.kmeans import kmeans_decode, nearest
from ..quant.pruning import magnitude_mask, pruned_count
from .qmodules import WeightQuantizer

logger = logging.getLogger(__name__)


class MaskedWeightQuantizer(WeightQuantizer):
    """Shared machinery for one weight [rows, cols]: the pruning mask and schedule, lazy
    initialization and optional checkpoint state. Their work happens in a module's training mode.

    ``state_groups``: names of saved tensors that load all together or not at all; a group missing
    from (or mis-shaped in) a checkpoint is rebuilt instead of failing the load.
    """

    state_groups: Tuple[Tuple[str, ...], ...] = (("mask",),)
    code_state: Tuple[str, ...] = ()  # buffers that the saved code holds (bit-packed): saved only there

    def __init__(self, spec: QuantSpec, shape: Sequence[int], schedule: Optional[PruneSchedule] = None):
        super().__init__(spec)
        self.shape, self.schedule = tuple(shape), schedule
        self.register_buffer("mask", torch.ones(self.shape, dtype=torch.bool) if schedule else None)
        self.num_updates = 0
        self.global_ranking = False  # the model prunes all its weights together (prune_globally)
        self._pruned: Optional[int] = 0
        if any("initialized" in group for group in self.state_groups):  # state built on first use: initialize
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
            self._ready = False
        self._step = None  # a subclass's per-update cache

    @property
    def rebuilt_state(self) -> Tuple[str, ...]:
        """The state a checkpoint may lack (models/base.py ``check_compatible``)."""
        return tuple(n for group in self.state_groups for n in group)

    # -- hooks for subclasses -------------------------------------------------------------------
    def initialize(self, w: torch.Tensor):
        """Build the quantizer's state from the latent weight ``w`` (no gradient)."""

    # -- fairseq hook ---------------------------------------------------------------------------
    def set_num_updates(self, num_updates: int):
        """fairseq calls ``model.set_num_updates(n)`` before every training forward."""
        self.num_updates = num_updates

    # -- the protocol ---------------------------------------------------------------------------
    def is_training_forward(self, w: torch.Tensor) -> bool:
        return self.training and torch.is_grad_enabled()

    def prepare(self, w: torch.Tensor):
        self.follow_schedule(w)
        self._ensure_ready(w)

    def gate(self, w: torch.Tensor) -> Optional[torch.Tensor]:
        return self.mask

    def storage_state(self) -> dict:
        state = super().storage_state()
        return state if self.mask is None else {**state, "kept": self.mask.numel() - self.pruned}

    def load_code(self, w, fields):
        """The code is rebuilt from the quantizer's own state, whose ``code_state`` buffers only the code holds."""
        code = packed_from_dict(self.code_method(), fields).unpack()
        return {name: getattr(code, name) for name in self.code_state if getattr(code, name) is not None}

    def _ensure_ready(self, w):
        if not self._ready:
            self.initialize(w.detach())
            self.initialized.fill_(True)
            self._ready = True

    def masked(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.mask is None else t * self.mask

    # -- pruning --------------------------------------------------------------------------------
    @property
    def pruned(self) -> int:
        if self._pruned is None:
            self._pruned = 0 if self.mask is None else int((~self.mask).sum())
        return self._pruned

    @property
    def sparsity(self) -> float:
        return self.pruned / (self.shape[0] * self.shape[1])

    def pruning_scores(self, w: torch.Tensor) -> torch.Tensor:
        """The values whose magnitudes decide what to prune (the latent weight by default)."""
        return w

    def follow_schedule(self, w: torch.Tensor):
        """Prune to the scheduled sparsity of the current update (masks only grow)."""
        if self.mask is None or self.global_ranking:
            return
        target = self.schedule.sparsity_at(self.num_updates)
        if pruned_count(self.mask.numel(), target) > self.pruned:
            self.set_mask(magnitude_mask(self.pruning_scores(w), target, keep=self.mask))

    def set_mask(self, mask: torch.Tensor):
        self.mask.copy_(mask)
        self._pruned = None

    # -- what the rest of the plugin reads ------------------------------------------------------
    def state_dict_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Saved as the module's ``weight``: the quantized value, or the latent one (masked) while
        nothing is built yet, so that saving never triggers clustering."""
        return self(w) if self._ready else self.masked(w)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Without the ``code_state`` buffers where the module saves the code (``checkpoint_entries``)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._ready and not keep_vars:
            for name in self.code_state:
                destination.pop(prefix + name, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """Load each state group if the checkpoint has all of it, else rebuild it (a plain checkpoint)."""
        for group in self.state_groups:
            pairs = [(getattr(self, n), state_dict.get(prefix + n)) for n in group]
            if any(own is None or saved is None or own.shape != saved.shape for own, saved in pairs):
                for n in group:
                    state_dict.pop(prefix + n, None)
                if "mask" in group and self.mask is not None:
                    self.mask.fill_(True)
                if "initialized" in group:
                    self.initialized.fill_(False)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        missing[:] = [k for k in missing if k not in {prefix + n for n in self.rebuilt_state}]
        self._pruned, self._cache, self._code, self._step = None, None, None, None
        if getattr(self, "initialized", None) is not None:
            self._ready = bool(self.initialized)

    def extra_repr(self):
        s = self.spec
        pruning = f", prune={list(self.schedule.steps)}" if self.schedule else ""
        return f"{s.method}, bits={s.bits}, granularity={s.granularity}{pruning}"


class KMeansQuantizer(MaskedWeightQuantizer):
    """k-means weight sharing: codebook fp32 [2^b] (per tensor) or [rows, 2^b], indices uint8 [rows, cols]."""

    state_groups = (("mask",), ("centroids", "indices", "centroid_delta", "initialized"))
    code_state = ("indices", "mask")

    def __init__(self, spec: QuantSpec, shape: Sequence[int], schedule: Optional[PruneSchedule] = None,
                 recluster_interval: int = 0, iters: int = 100):
        super().__init__(spec, shape, schedule)
        k = 2**spec.bits
        codebook_shape = (self.shape[0], k) if spec.granularity == "channel" else (k,)
        self.register_buffer("centroids", torch.zeros(codebook_shape))
        self.register_buffer("indices", torch.zeros(self.shape, dtype=torch.uint8))
        self.centroid_delta = nn.Parameter(torch.zeros(codebook_shape))
        self.recluster_interval, self.iters = recluster_interval, iters
        self.trains_latent = recluster_interval > 0
        self._reclustered_at = self._assigned = None

    def codebook(self) -> torch.Tensor:
        return self.centroids + self.centroid_delta

    def initialize(self, w: torch.Tensor, init: Optional[torch.Tensor] = None):
        """Cluster the kept values of ``w`` (k-means++, or warm-started from ``init``)."""
        start = time.perf_counter()
        qw = kmeans_weight(w, self.spec.bits, self.spec.granularity, self.mask, init, self.iters)
        logger.info("k-means %s: %d clusters per %s of a %dx%d weight, at most %d iterations: %.2f s",
                    "warm start" if init is not None else "initialization", 2**self.spec.bits,
                    "row" if self.spec.granularity == "channel" else "tensor", *self.shape, self.iters,
                    time.perf_counter() - start)
        self.centroids.copy_(qw.codebook.to(self.centroids) - self.centroid_delta.detach())
        self.indices.copy_(qw.indices)

    def follow_schedule(self, w: torch.Tensor):
        super().follow_schedule(w)
        n = self.num_updates
        if not (self.trains_latent and self._ready) or self._assigned == (w._version, n):
            return
        if n > 0 and n % self.recluster_interval == 0 and n != self._reclustered_at:
            self.initialize(w, init=self.codebook().detach())
            self._reclustered_at = n
        else:
            self.reassign(w)
        self._assigned = (w._version, n)

    def reassign(self, w: torch.Tensor):
        """Re-clustering mode, every training update: each latent weight takes its nearest centroid, so
        the forward follows the latent weight between re-clusterings. (With fixed assignments it
        would not: the straight-through latent weight would then get the same gradient for N updates
        without any effect on the loss, and drift until the next re-clustering; on the demo model the
        loss went from 5.1 to 10.6 within three re-clusterings.)"""
        k = 2**self.spec.bits
        groups = self.shape[0] if self.centroids.dim() == 2 else 1
        ascending, order = self.codebook().detach().reshape(groups, k).sort(-1)
        idx = order.gather(1, nearest(w.reshape(groups, -1).float(), ascending))
        self.indices.copy_(idx.reshape(self.shape))

    def pruning_scores(self, w: torch.Tensor) -> torch.Tensor:
        """The fixed assignments' values (the latent weight before clustering or while it trains)."""
        return w if self.trains_latent or not self._ready else kmeans_decode(self.codebook(), self.indices, self.mask)

    def train_value(self, w: torch.Tensor) -> torch.Tensor:
        """The trained codebook's value (its gradient: the sum of its members'), straight-through to a
        latent weight that trains (re-clustering mode)."""
        wq = kmeans_decode(self.codebook(), self.indices, self.mask).to(w.dtype)
        return straight_through(w, wq, self.mask) if self.trains_latent else wq

    def search(self, w: torch.Tensor) -> KMeansWeight:
        self._ensure_ready(w)
        mask = None if self.mask is None else self.mask.clone()
        return KMeansWeight(self.codebook().detach().float(), self.indices.clone(), self.spec.bits, mask)

    def extra_repr(self):
        recluster = f", recluster_interval={self.recluster_interval}" if self.recluster_interval else ""
        return super().extra_repr() + recluster


class BSFlexQuantizer(MaskedWeightQuantizer):
    """BS-Flex: centroids fp32 [2] (per tensor) or [rows, 2], ascending; ``fixed`` keeps them constant."""

    state_groups = (("mask",), ("centroids", "initialized"))
    code_state = ("mask",)

    def __init__(self, spec: QuantSpec, shape: Sequence[int], schedule: Optional[PruneSchedule] = None,
                 fixed: bool = False):
        super().__init__(spec, shape, schedule)
        per_row = spec.granularity == "channel"
        self.groups = self.shape[0] if per_row else 1
        self.register_buffer("centroids", torch.zeros((self.groups, 2) if per_row else (2,)))
        self.fixed = fixed

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.groups, -1)

    def initialize(self, w: torch.Tensor):
        centroids = bsflex_init(self._rows(w).float(), None if self.mask is None else self._rows(self.mask))
        self.centroids.copy_(centroids.reshape(self.centroids.shape))

    def split(self, w: torch.Tensor, update: bool):
        """(upper: bool [groups, n], centroids [groups, 2]) for the latent ``w``; ``update`` stores the centroids."""
        x, centroids = self._rows(w.detach()).float(), self.centroids.reshape(self.groups, 2).float()
        if self.fixed:
            return x > centroids.mean(1, keepdim=True), centroids
        mask = None if self.mask is None else self._rows(self.mask)
        upper, centroids = bsflex_step(x, centroids, mask)
        if update:
            self.centroids.copy_(centroids.reshape(self.centroids.shape))
        return upper, centroids

    def _as_code(self, upper, centroids) -> KMeansWeight:
        mask = None if self.mask is None else self.mask.clone()
        return KMeansWeight(centroids.reshape(self.centroids.shape).float(), upper.reshape(self.shape).to(torch.uint8),
                            1, mask)

    def train_value(self, w: torch.Tensor) -> torch.Tensor:
        key = (w.data_ptr(), w._version, self.num_updates)  # one step per update, shared by tied modules
        if self._step is None or self._step[0] != key:
            self._step = (key, self._as_code(*self.split(w, update=True)).dequantize().to(w.dtype))
        return straight_through(w, self._step[1], self.mask)

    def search(self, w: torch.Tensor) -> KMeansWeight:
        self._ensure_ready(w)
        return self._as_code(*self.split(w, update=False))

    def extra_repr(self):
        return super().extra_repr() + (", fixed centroids" if self.fixed else "")


class PruneQuantizer(MaskedWeightQuantizer):
    """Iterative magnitude pruning alone: ``w_hat = w * mask`` in full precision."""

    def train_value(self, w: torch.Tensor) -> torch.Tensor:
        return self.masked(w)

    def search(self, w: torch.Tensor) -> SparseWeight:
        return SparseWeight(values=self.masked(w.detach()).float(), mask=self.mask.clone())

    def extra_repr(self):
        return f"prune={list(self.schedule.steps)}"
