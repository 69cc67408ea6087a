"""The CPU output cache's effect (locdiff.set_output_cache), same process, interleaved:
`python benchmarks/tools/sh_output_cache.py [--threads 2] [--values 4000000]` prints ns per output
value with the cache on (default 1 GiB) and off (every output a fresh allocation), forward,
best of 15 calls per round and of 3 rounds."""
import argparse
import time

import torch

import locdiff


def best(fn, calls=15):
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--values", type=int, default=4_000_000, help="output values per call")
    ap.add_argument("--degrees", default="4,16,64,128,256,512")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    on = locdiff.set_output_cache(1 << 30)
    print("| dtype | L | cache on | cache off | off / on |\n|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float64):
        for degree in map(int, args.degrees.split(",")):
            n = max(64, args.values // (degree + 1) ** 2)
            xyz = torch.randn(n, 3, dtype=dtype, generator=torch.Generator().manual_seed(degree))
            locdiff.spherical_harmonics(xyz, degree)  # tables, first-touch
            times = {}
            for _ in range(3):
                for limit in (1 << 30, 0):
                    locdiff.set_output_cache(limit)
                    t = best(lambda: locdiff.spherical_harmonics(xyz, degree))
                    times[limit] = min(times.get(limit, t), t)
            scale = 1e9 / (n * (degree + 1) ** 2)
            a, b = times[1 << 30] * scale, times[0] * scale
            print(f"| {str(dtype).removeprefix('torch.')} | {degree} | {a:.3f} | {b:.3f} | {b / a:.2f}x |", flush=True)
    locdiff.set_output_cache(on)


if __name__ == "__main__":
    main()
