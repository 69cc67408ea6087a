"""locdiff vs sphericart forward per call, from one point to many: the per-call cost.

    python benchmarks/tools/sh_batch_sizes.py [--threads 2] [--rounds 30] [--degrees 4,16,64]
        [--points 1,64,1024,16384] [--dtype float64] [--apart]

The pytest benchmarks time calls of a few million values, where per-call costs vanish. A
location encoder in a training loop calls with one batch (hundreds of points) at a time,
where the Python layer and thread wake-ups can cost more than the harmonics. Each round
times every implementation in turn (best of each, as sh_interleaved.py), into fresh outputs
as a caller gets them; the table gives microseconds per call and the ratio.

Interleaving has a cost of its own at small calls: sphericart ships its own libgomp, whose
threads spin on the cores after each call, so the next library's threads wait on them (and
the other way round). --apart times each implementation in its own block of rounds instead,
as a caller that uses one library sees it.
"""
import argparse

import numpy as np
import torch

from sh_interleaved import best_of

import locdiff


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--degrees", default="4,16,64")
    ap.add_argument("--points", default="1,64,1024,16384")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    ap.add_argument("--apart", action="store_true",
                    help="time each implementation in its own block of rounds, not interleaved")
    a = ap.parse_args()
    try:
        import sphericart
    except ImportError:
        raise SystemExit("sh_batch_sizes.py: this table compares with sphericart, which is not installed "
                         "(pip install sphericart, or the bench extra on a machine with a CUDA torch)")

    torch.set_num_threads(a.threads)
    print("| L | points | locdiff (torch) us | locdiff (numpy) us | sphericart us | sphericart / locdiff (torch) "
          "| sphericart / locdiff (numpy) |")
    print("|---|---|---|---|---|---|---|")
    for degree in map(int, a.degrees.split(",")):
        sc = sphericart.SphericalHarmonics(degree)
        for n in map(int, a.points.split(",")):
            x = np.random.default_rng(n).standard_normal((n, 3)).astype(a.dtype)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            xt = torch.from_numpy(x)
            # Enough calls per timing that one lasts well above the clock's resolution.
            reps = max(1, 20_000 // (n * (degree + 1) ** 2 // 64 + 1))

            def repeat(fn):
                return lambda: [fn() for _ in range(reps)]

            calls = [repeat(lambda: locdiff.spherical_harmonics(xt, degree)),
                     repeat(lambda: locdiff.spherical_harmonics(x, degree)),
                     repeat(lambda: sc.compute(x))]
            if a.apart:
                t = [best_of([call], a.rounds)[0] for call in calls]
            else:
                t = best_of(calls, a.rounds)
            us = [v / reps * 1e6 for v in t]
            print(f"| {degree} | {n} | {us[0]:.1f} | {us[1]:.1f} | {us[2]:.1f} | {us[2] / us[0]:.2f}x | {us[2] / us[1]:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
