"""Best ns per output value of ``locdiff.spherical_harmonics`` (CPU, 2M values a call, best
of 15 calls) for a few degrees and both dtypes, on one line: to compare two builds, run it
under each in alternation (several times each), so that load drift hits both alike.

    python benchmarks/tools/sh_per_value.py
"""
import time

import torch

import locdiff


def main() -> None:
    torch.set_num_threads(2)
    out = []
    for dt in (torch.float32, torch.float64):
        for degree in (4, 8, 16, 32, 64, 256):
            k = (degree + 1) ** 2
            n = max(1, 2_000_000 // k)
            xyz = torch.randn(n, 3, dtype=dt, generator=torch.Generator().manual_seed(0))
            locdiff.spherical_harmonics(xyz, degree)
            best = float("inf")
            for _ in range(15):
                t = time.perf_counter()
                y = locdiff.spherical_harmonics(xyz, degree)
                best = min(best, time.perf_counter() - t)
                del y
            out.append(f"{str(dt).split('.')[1]}:{degree}:{best / (n * k) * 1e9:.3f}")
    print(" ".join(out))


if __name__ == "__main__":
    main()
