"""Time BS-Flex against 1-bit k-means on one weight tensor (the poster claims BS-Flex is > 10x faster).

    OMP_NUM_THREADS=1 python scripts/bench_bsflex.py --rows 2048 --cols 512

Rows of the output (median of --repeat runs, one CPU thread unless OMP_NUM_THREADS says otherwise):
- k-means, this plugin: k-means++ seeding + Lloyd on sorted values until no weight moves;
- k-means, textbook Lloyd: the same seeding, then dense nearest-centroid search and scatter means;
- BS-Flex, to convergence: split at 0, then BS-Flex steps (pure tensor indexing) until no weight moves;
- BS-Flex, one step: what one training update costs (nearest of two centroids + member means).
"""
import argparse
import statistics
import time

import torch

from fairseq_qplugin.quant import QuantSpec, bsflex_init, bsflex_step, kmeans_weight, quantize
from fairseq_qplugin.quant.kmeans import kmeans_plus_plus


def textbook_kmeans(x: torch.Tensor, k: int, iters: int = 100) -> torch.Tensor:
    """Lloyd's algorithm as usually written: distances to every centroid, argmin, scatter means."""
    x = x.reshape(-1)
    centroids = kmeans_plus_plus(x.reshape(1, -1), k, torch.ones(1, x.numel()), torch.Generator().manual_seed(0))[0]
    idx = None
    for _ in range(iters):
        new = (x[:, None] - centroids[None, :]).abs().argmin(1)
        if idx is not None and torch.equal(new, idx):
            break
        idx = new
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, x.double())
        counts = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, torch.ones_like(x, dtype=torch.float64))
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids.double()).float()
    return centroids


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    w = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)) * 0.05
    x = w.reshape(1, -1)
    centroids = bsflex_init(x)
    rows = [
        ("k-means 1 bit, this plugin (sorted 1-D Lloyd)", lambda: kmeans_weight(w, 1)),
        ("k-means 1 bit, textbook Lloyd (dense argmin)", lambda: textbook_kmeans(w, 2)),
        ("BS-Flex, to convergence", lambda: quantize(w, QuantSpec(method="bsflex", bits=1, granularity="tensor"))),
        ("BS-Flex, one step (one training update)", lambda: bsflex_step(x, centroids)),
    ]
    print(f"{args.rows} x {args.cols} weights, {torch.get_num_threads()} thread(s), median of {args.repeat}")
    base = None
    for name, fn in rows:
        seconds = timed(fn, args.repeat)
        base = base or seconds
        print(f"{name:50s} {seconds * 1e3:9.1f} ms   {base / seconds:6.1f}x vs the first row")


if __name__ == "__main__":
    main()
