"""Per-layer latency of packed kernels vs fp32 and torch.ao dynamic int8; prints a markdown table.

    OMP_NUM_THREADS=1 python benchmarks/bench_layers.py [--rows 1,5,20,64] [--reps 20] [--shapes 512x512,...]

Every number in one table comes from one run. Shapes are ``out x in`` of transformer-base layers;
"rows" is the number of activation rows (1 = greedy step, 5..320 = beam search). The bandwidth floor
is the time to read the packed BCQ 2-bit weight at the measured copy bandwidth of this machine.
Our kernels are the pure-torch ones (pack/kernels.py): LUT-GEMM up to ``LUT_MAX_ROWS`` rows,
block dequantization beyond.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from fairseq_qplugin.pack.formats import pack_weight
from fairseq_qplugin.pack.kernels import packed_linear
from fairseq_qplugin.quant import QuantSpec, kmeans_weight, quantize


def timeit(fn, reps):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def copy_bandwidth() -> float:
    """Bytes per second of a 64 MiB tensor copy (read + write)."""
    a = torch.empty(16 << 20)
    b = torch.empty_like(a)
    ms = timeit(lambda: b.copy_(a), 5)
    return 2 * a.numel() * 4 / (ms / 1e3)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="512x512,2048x512,512x2048,32000x512")
    p.add_argument("--rows", default="1,5,20,64")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    cols_ = ["fp32", "ao int8", "bcq2", "bcq3", "int8", "kmeans4", "floor bcq2"]
    print(f"threads={torch.get_num_threads()}, copy bandwidth {bw / 1e9:.1f} GB/s; times in ms\n")
    print("| shape (out x in) | rows | " + " | ".join(cols_) + " |")
    print("|---|---:|" + "---:|" * len(cols_))
    for shape in args.shapes.split(","):
        out_f, in_f = map(int, shape.split("x"))
        w = torch.randn(out_f, in_f) * 0.05
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        lin.weight.data.copy_(w)
        ao = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        packed = {
            "bcq2": pack_weight(quantize(w, QuantSpec("bcq", 2))),
            "bcq3": pack_weight(quantize(w, QuantSpec("bcq", 3))),
            "int8": pack_weight(quantize(w, QuantSpec("int", 8))),
            "kmeans4": pack_weight(kmeans_weight(w, 4, iters=5)),
        }
        floor = packed["bcq2"].nbytes() / bw * 1e3
        for n in map(int, args.rows.split(",")):
            x = torch.randn(n, in_f)
            with torch.no_grad():
                times = [timeit(lambda: F.linear(x, w), args.reps), timeit(lambda: ao(x), args.reps)]
                times += [timeit(lambda: packed_linear(x, pw), args.reps) for pw in packed.values()]
            cells = " | ".join(f"{t:.3f}" for t in times + [floor])
            print(f"| {shape} | {n} | {cells} |")


if __name__ == "__main__":
    main()
