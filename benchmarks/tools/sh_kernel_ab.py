"""Two or more builds of locdiff._C, the CPU forward kernel alone, in alternating processes.

    python benchmarks/tools/sh_kernel_ab.py OLD.so NEW.so [--degrees 1,2,3,4] [--points 32768]
        [--threads 1] [--rounds 3]

For A/B runs of a kernel change: copy the built extension aside before and after it (from
site-packages/locdiff/ or build/), then compare them here. Each round runs every build in a
fresh process in turn (one process cannot load two builds of the same module), and each
process keeps its best of ten timings per case; the table gives each build's best over the
rounds, in ns per point, into one reused output (no page faults, no Python-layer cost).
Alternating whole processes lets a shared machine's drift hit every build alike.
"""
import argparse
import json
import subprocess
import sys

WORKER = r"""
import importlib.machinery, importlib.util, json, sys, time
import torch
path, degrees, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
loader = importlib.machinery.ExtensionFileLoader("locdiff._C", path)
module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("locdiff._C", path, loader=loader))
loader.exec_module(module)
result = {}
for dtype in ("float32", "float64"):
    for degree in map(int, degrees.split(",")):
        K = (degree + 1) ** 2
        xyz = torch.randn(n, 3, dtype=getattr(torch, dtype))
        out = torch.zeros(n, K, dtype=xyz.dtype)
        reps = max(1, 300_000 // (n * K // 64 + 1))
        best = float("inf")
        for _ in range(10):
            t0 = time.perf_counter()
            for _ in range(reps):
                module.sh_cpu(xyz.data_ptr(), n, degree, out.data_ptr(), threads, dtype)
            best = min(best, (time.perf_counter() - t0) / reps / n * 1e9)
        result[f"{dtype} {degree}"] = best
print(json.dumps(result))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("builds", nargs="+", help="paths of built _C extension files")
    ap.add_argument("--degrees", default="1,2,3,4")
    ap.add_argument("--points", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if len(a.builds) < 2:
        ap.error(f"builds: give at least two extension files to compare, got {len(a.builds)}")
    best = {}
    for _ in range(a.rounds):
        for build in a.builds:
            line = subprocess.run([sys.executable, "-c", WORKER, build, a.degrees, str(a.points), str(a.threads)],
                                  check=True, capture_output=True, text=True).stdout
            for case, ns in json.loads(line).items():
                by_build = best.setdefault(case, {})
                by_build[build] = min(by_build.get(build, float("inf")), ns)
    print("| case | " + " | ".join(a.builds) + " | first / last |")
    print("|---|" + "---|" * (len(a.builds) + 1))
    for case, by_build in best.items():
        times = [by_build[b] for b in a.builds]
        print(f"| {case} | " + " | ".join(f"{t:.2f}" for t in times) + f" | {times[0] / times[-1]:.2f}x |")


if __name__ == "__main__":
    main()
