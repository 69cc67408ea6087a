"""The decode's refinement on CUDA, the two routes side by side (interleaved rounds, best of
each): the torch loop (locdiff.ops.shdd_reference.shdd_refine_reference with f and gradient
from the CUDA SH kernels; decode's default on CUDA) against the one-kernel Triton loop
(locdiff.ops.triton.refine; decode(backend="triton")). Also checks that both reach
the same maxima. Prints a markdown table; a one-off A/B (the GPU script times decode as a whole).

    python benchmarks/tools/refine_ab.py [--degrees 16,64,256] [--points 64,16384] [--rounds 5]
    TRITON_INTERPRET=1 python benchmarks/tools/refine_ab.py --device cpu --degrees 6 --points 8 --rounds 1
"""
import argparse
import time

import torch

from locdiff import grids, shdd
from locdiff.geo import latlon_to_xyz
from locdiff.ops.registry import pick


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, rounds):
    fn()  # compile / warm
    sync()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--degrees", default="16,64,256")
    ap.add_argument("--points", default="64,16384")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test under TRITON_INTERPRET=1")
    args = ap.parse_args()
    print("| L | points | torch loop ms | triton kernel ms | torch / triton | max position difference |")
    print("|---|---|---|---|---|---|")
    for degree in map(int, args.degrees.split(",")):
        for n in map(int, args.points.split(",")):
            g = torch.Generator().manual_seed(degree)
            lat = torch.rand(n, generator=g, dtype=torch.float64) * 180 - 90
            lon = torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180
            truth = torch.stack([lat, lon], -1)
            c = shdd.encode(truth, degree) + 0.02 * torch.randn(n, (degree + 1) ** 2, generator=g,
                                                               dtype=torch.float64)
            start = latlon_to_xyz(truth) + 0.3 / degree * torch.randn(n, 3, generator=g, dtype=torch.float64)
            c, start, rows = c.to(args.device), start.to(args.device), torch.arange(n, device=args.device)
            times = {}
            outs = {}
            for _ in range(2):  # interleaved: each route twice, best of all rounds
                for backend in (None, "triton"):
                    def run(b=backend):
                        outs[b] = pick("shdd_refine", c.device.type, b)(c, start, rows, degree, grids.half_max_radius(degree), 40)
                    t = timed(run, args.rounds)
                    times[backend] = min(times.get(backend, t), t)
            diff = float((outs[None][0] - outs["triton"][0]).abs().max())
            a, b = times[None] * 1e3, times["triton"] * 1e3
            print(f"| {degree} | {n} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
