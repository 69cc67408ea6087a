"""Per-call cost of mid-size CPU outputs when the caller holds a few at a time.

    python benchmarks/tools/sh_held_outputs.py [--degree 16] [--points 256,512,1024] [--hold 1,2,3]
        [--pool-min-kb 4096,1024] [--threads 2]

glibc gives the top of its heap back to the OS once enough is freed there, so a loop that
keeps two or three outputs of a megabyte or two alive (a training step's activations) can
fault in every page of each new one. Each row runs in a fresh process (a fresh heap), with
locdiff's output pool taking outputs from the given size up (POOL_MIN_BYTES), and reports
the best microseconds per call and the page faults per call.
"""
import argparse
import resource
import subprocess
import sys
import time


def measure(degree, points, hold, pool_min_bytes, threads):
    import torch

    import locdiff
    from locdiff.ops import output_pool

    output_pool.POOL_MIN_BYTES = pool_min_bytes
    torch.set_num_threads(threads)
    xyz = torch.nn.functional.normalize(torch.randn(points, 3, dtype=torch.float64), dim=1)

    def step():
        return [locdiff.spherical_harmonics(xyz, degree) for _ in range(hold)]

    for _ in range(3):
        step()
    calls = max(20, 40_000 // points)
    best = float("inf")
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        best = min(best, (time.perf_counter() - t0) / (calls * hold))
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / (5 * calls * hold)
    kb = points * (degree + 1) ** 2 * 8 // 1024
    print(f"| {points} | {kb} | {hold} | {pool_min_bytes >> 10} | {best * 1e6:.1f} | {faults:.1f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--degree", type=int, default=16)
    ap.add_argument("--points", default="256,512,1024")
    ap.add_argument("--hold", default="1,2,3")
    ap.add_argument("--pool-min-kb", default="4096,1024")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs=4, type=int, help=argparse.SUPPRESS)  # a row, in this process
    a = ap.parse_args()
    if a.one:
        measure(a.degree, *a.one[:3], threads=a.one[3])
        return
    print(f"float64, L = {a.degree}, {a.threads} threads")
    print("| points | output KB | held | pool from KB | us per call | page faults per call |")
    print("|---|---|---|---|---|---|")
    for points in map(int, a.points.split(",")):
        for hold in map(int, a.hold.split(",")):
            for kb in map(int, a.pool_min_kb.split(",")):
                subprocess.run([sys.executable, __file__, "--degree", str(a.degree), "--one",
                                str(points), str(hold), str(kb << 10), str(a.threads)], check=True)


if __name__ == "__main__":
    main()
