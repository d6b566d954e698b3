"""Per-layer latency of the packed kernels vs fp32 and torch.ao dynamic int8; prints one markdown table.

    python benchmarks/bench_layers.py                      # threads 1 and 2, every shape and row count
    python benchmarks/bench_layers.py --threads 1 --shapes 512x2048 --rows 1,5
    python benchmarks/bench_layers.py --crossover          # direct kernel vs dequantize-tile + BLAS
    python benchmarks/bench_layers.py --threads 1 --cpu-time   # on a loaded machine
    python benchmarks/bench_layers.py --runtime --shapes 512x512,512x2048,2048x512 --rows 1,5,64

Every number of a table comes from one run; each cell is the best of ``--rounds`` rounds, the
candidates of one row being timed in turn inside each round, so load changes hit all of them alike.
Shapes are ``out x in`` (512x32000 is a 32000-wide input, 32000x512 the output projection); "rows"
is the number of activation rows (1 = greedy step, 5 = beam 5, 20..320 = beams and the encoder).
Columns: fp32 ``F.linear``; ``torch.ao`` dynamic int8 (fbgemm, int8 activations); our
``packed_linear`` on BCQ 2 and 3 bits and k-means 4 bits (per-tensor codebook), and int8
(``PackedInt`` through the int8 GEMM of pack/int8.py, as ``PackedLinear`` runs 8-bit weights); "floor X" = bytes of the weight in format X / the measured copy bandwidth (the time just
to stream the weight from DRAM; layers that fit in cache can beat it); the last two columns are the
speedups of BCQ 3-bit over fp32 and over torch.ao int8. Which kernels ran (C++ ISA or pure torch) is
printed above the table; ``QPLUGIN_KERNELS=torch`` benchmarks the fallback. ``--runtime`` adds the
torch-free runtime's product on the same BCQ 3-bit weight (``fairseq_qruntime.model.BcqLayer``, called
through ctypes: a few microseconds of call overhead are included) with its exact fp32 arithmetic
("rt bcq3": lookup tables for few rows, dequantize + GEMM for many) and with int16 arithmetic ("rt bcq3
int16": tables up to 96 rows, an int16 GEMM above), and their speedups over torch.ao int8 and fp32.
"""
import argparse
import logging
import time
import warnings

import torch
import torch.nn.functional as F

from fairseq_qplugin.pack import int8
from fairseq_qplugin.quant.packed import pack_weight
from fairseq_qplugin.pack.kernels import packed_linear, resolve_backend
from fairseq_qplugin.quant import QuantSpec, kmeans_weight, quantize

SHAPES = "512x512,512x2048,2048x512,512x32000,32000x512"


CLOCK = time.perf_counter


def race(fns, rounds, min_ms=20.0):
    """Best ms per call of each function; the functions take turns within every round."""
    reps = []
    for f in fns:  # warm up and pick repetitions so one timing lasts about min_ms
        f()
        t0 = CLOCK()
        f()
        reps.append(max(1, int(min_ms / max(1e-3, (CLOCK() - t0) * 1e3))))
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for k, f in enumerate(fns):
            t0 = CLOCK()
            for _ in range(reps[k]):
                f()
            best[k] = min(best[k], (CLOCK() - t0) / reps[k] * 1e3)
    return best


def copy_bandwidth() -> float:
    """Bytes per second of a 256 MiB tensor copy (read + write), i.e. DRAM bandwidth."""
    a = torch.empty(32 << 20)
    b = torch.empty_like(a)
    ms = race([lambda: b.copy_(a)], rounds=3, min_ms=50)[0]
    return 2 * a.numel() * 4 / (ms / 1e3)


def packed_weights(w):
    return {
        "bcq2": pack_weight(quantize(w, QuantSpec("bcq", 2))),
        "bcq3": pack_weight(quantize(w, QuantSpec("bcq", 3))),
        "int8": pack_weight(quantize(w, QuantSpec("int", 8))),
        "kmeans4": pack_weight(kmeans_weight(w, 4, iters=3)),
    }


def layer_weights(args):
    """(threads, shape, w) for each thread count and ``out x in`` shape, with torch set to those threads."""
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for shape in args.shapes.split(","):
            out_f, in_f = map(int, shape.split("x"))
            torch.manual_seed(0)
            yield threads, shape, torch.randn(out_f, in_f) * 0.05


def ao_int8(w):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)


def layer_table(args, bw):
    cols = ["fp32", "ao int8", "bcq2", "bcq3", "int8", "kmeans4",
            "floor fp32", "floor bcq2", "floor bcq3", "floor int8", "floor km4", "fp32/bcq3", "ao/bcq3"]
    if args.runtime:
        from fairseq_qruntime.model import BcqLayer
        cols += ["rt bcq3", "rt bcq3 int16", "ao/rt", "ao/rt int16", "fp32/rt int16"]
    print("| threads | shape (out x in) | rows | " + " | ".join(cols) + " |")
    print("|---:|---|---:|" + "---:|" * len(cols))
    for threads, shape, w in layer_weights(args):
        in_f = w.shape[1]
        ao, packed = ao_int8(w), packed_weights(w)
        if args.runtime:
            b3 = packed["bcq3"]
            rts = [BcqLayer(b3.planes.numpy(), b3.alpha.float().numpy(), in_f, lut) for lut in ("fp32", "int16")]
        int8_gemm = int8.prepack(packed["int8"], None)
        floors = [w.numel() * 4 / bw * 1e3] + [pw.nbytes() / bw * 1e3 for pw in packed.values()]
        for n in map(int, args.rows.split(",")):
            x = torch.randn(n, in_f)
            fns = [lambda: F.linear(x, w), lambda: ao(x)]
            fns += [(lambda: int8.int8_linear(x, int8_gemm)) if name == "int8" and int8_gemm is not None
                    else (lambda pw=pw: packed_linear(x, pw)) for name, pw in packed.items()]
            if args.runtime:
                xn = x.numpy()
                fns += [lambda L=L: L.linear(xn, threads) for L in rts]
            with torch.no_grad():
                t = race(fns, args.rounds)
            rt_t, t = t[len(packed) + 2:], t[:len(packed) + 2]
            cells = [f"{v:.3f}" for v in t + floors] + [f"{t[0] / t[3]:.2f}x", f"{t[1] / t[3]:.2f}x"]
            if args.runtime:
                cells += [f"{v:.3f}" for v in rt_t] + [f"{t[1] / rt_t[0]:.2f}x", f"{t[1] / rt_t[1]:.2f}x",
                                                       f"{t[0] / rt_t[1]:.2f}x"]
            print(f"| {threads} | {shape} | {n} | " + " | ".join(cells) + " |", flush=True)


def crossover_table(args):
    """ms of the direct kernel (small_max=1000) vs dequantize-tile + BLAS (small_max=0) by row count."""
    print("| threads | shape | rows | fp32 | bcq3 direct | bcq3 tile+BLAS | kmeans4 direct | kmeans4 tile+BLAS |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for threads, shape, w in layer_weights(args):
        in_f = w.shape[1]
        packed = packed_weights(w)
        b3, k4 = packed["bcq3"], packed["kmeans4"]
        for n in map(int, args.rows.split(",")):
            x = torch.randn(n, in_f)
            t = race([lambda: F.linear(x, w)] + [lambda pw=pw, s=s: packed_linear(x, pw, small_max=s)
                                                  for pw in (b3, k4) for s in (1000, 0)], args.rounds)
            print(f"| {threads} | {shape} | {n} | " + " | ".join(f"{v:.3f}" for v in t) + " |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--rows", default=None, help="default 1,5,20,64 (--crossover: 1,2,4,6,8,12,16,24,32,64)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runtime", action="store_true",
                   help="add the torch-free runtime's BCQ 3-bit product (fp32 and int16 arithmetic)")
    p.add_argument("--crossover", action="store_true", help="direct kernel vs tile + BLAS by row count")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with the calling thread's CPU time (robust on a loaded machine; 1 thread only)")
    args = p.parse_args()
    global CLOCK
    if args.cpu_time:
        if args.threads != "1":
            p.error("--cpu-time measures the calling thread only: use it with --threads 1")
        CLOCK = time.thread_time
    logging.basicConfig(level=logging.WARNING)
    backend = resolve_backend()
    print(f"kernels: {'pure torch' if backend == 'torch' else 'C++ ' + backend}; torch {torch.__version__}; "
          f"{'thread CPU' if args.cpu_time else 'wall-clock'} ms per call (best of {args.rounds} rounds)")
    if args.crossover:
        args.rows = args.rows or "1,2,4,6,8,12,16,24,32,64"
        crossover_table(args)
        return
    args.rows = args.rows or "1,5,20,64"
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s\n")
    layer_table(args, bw)


if __name__ == "__main__":
    main()
