"""Summarise a pytest-benchmark JSON of the GPU run: per spherical-harmonics benchmark, the
output bandwidth (bytes written / median time) against the copy bandwidth measured in the
same run (benchmarks/test_gpu_bandwidth.py). Prints a table; writes nothing."""
from __future__ import annotations

import json
import sys

SIZES = {"float32": 4, "float64": 8}


def main(path: str) -> None:
    try:
        data = json.load(open(path))
    except FileNotFoundError:
        print(f"{path}: no benchmark JSON (nothing ran?)")
        return
    rows, copy = [], None
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if info.get("op") == "copy":
            copy = info.get("copy_gbps_read_plus_write")
            continue
        if info.get("op") != "sh" or info.get("degree") is None or not info.get("items"):
            continue
        k = (int(info["degree"]) + 1) ** 2
        out_bytes = int(info["items"]) * k * SIZES.get(str(info.get("dtype")).replace("torch.", ""), 4)
        gbps = out_bytes / b["stats"]["median"] / 1e9
        rows.append((info.get("impl"), info.get("passes", "fwd"), info["degree"],
                     info.get("dtype"), b["name"], gbps, b["stats"]["median"]))
    print(f"machine: {data.get('machine_info', {}).get('node')}  commit: {data.get('commit_info', {}).get('id')}")
    print(f"copy bandwidth (read + write): {copy} GB/s")
    # Output bandwidth is meaningful for the forward pass only; fwd+bwd shows its time.
    print(f"{'impl':18} {'passes':8} {'degree':>6} {'dtype':8} {'median ms':>10} {'out GB/s':>9} {'vs copy':>8}")
    for impl, passes, degree, dtype, name, gbps, med in sorted(
            rows, key=lambda r: (str(r[1]), int(r[2]), str(r[3]), str(r[0]))):
        fwd = passes == "fwd"
        frac = f"{gbps / copy:7.0%}" if copy and fwd else "       "
        bw = f"{gbps:9.1f}" if fwd else " " * 9
        print(f"{str(impl):18} {passes:8} {degree:>6} {str(dtype):8} {med * 1e3:10.3f} {bw} {frac:>8}")
    if not rows:
        print("no spherical-harmonics benchmarks with extra_info (op='sh', degree, dtype, items) found")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sh_cuda.json")
