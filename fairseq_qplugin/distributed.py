"""Data-parallel training (fairseq's DDP): what keeps the quantization identical on every rank.

fairseq all-reduces the gradients, so every rank holds the same latent weights after each update.
Quantizer state computed from them alone is then the same everywhere without communication: k-means
codebooks and assignments (k-means++ with a fixed seed), BS-Flex centroids, pruning masks, pNR
warm-start scales, frequency groups (from the dictionary). What each rank measures on its own batch
is not: activation ranges are all-reduced here, so every rank holds the range of the combined batch
(what one process training on the combined batch would hold). And what only the saving rank does
must not change the model: pNR skips its save-time sync (``optim/pnr.py``). tests/test_distributed.py
checks bit equality on 2 ranks.
"""
from typing import Optional, Tuple

import torch
import torch.distributed as dist


def data_parallel_group() -> Optional[object]:
    """fairseq's data-parallel process group when there are 2 ranks or more, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from fairseq.distributed import utils

    group = utils.get_data_parallel_group()
    return group if utils.get_world_size(group) > 1 else None


def global_range(lo: torch.Tensor, hi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The smallest ``lo`` and the largest ``hi`` (0-d tensors) over the data-parallel ranks."""
    group = data_parallel_group()
    if group is None:
        return lo, hi
    both = torch.stack([-lo, hi])  # one all-reduce: max(-lo) = -min(lo), exactly
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return -both[0], both[1]
