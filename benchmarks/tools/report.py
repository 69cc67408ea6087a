"""Markdown tables from a pytest-benchmark JSON of test_sh_bench.py / test_decode_bench.py /
test_kl_bench.py / test_train_bench.py.

    python benchmarks/tools/report.py benchmarks/results/MACHINE/sh_cpu.json

Spherical harmonics: ns per output value (best time of the rounds / values; on a shared
machine the median carries the neighbours' load), per pass; a * marks a result that failed
the accuracy check (error per unit over 2e-6 float32 / 1e-11 float64) with the degree it
goes wrong from. Decode and SHDD-KL (forward + backward): best time in ms per call.
Training: samples per second (``extra_info["samples_per_s"]``, the best of its rounds).
"""
import collections
import json
import sys


def sh_table(benchmarks):
    rows = collections.defaultdict(dict)
    impls = []
    for b in benchmarks:
        e = b["extra_info"]
        if e.get("op") != "sh":
            continue
        key = (e["device"], e["dtype"], e["degree"])
        ns = b["stats"]["min"] * 1e9 / e["values"]
        col = e["impl"] if e["impl"] == "store-floor" else f'{e["impl"]} {e["passes"]}'
        if col not in impls:
            impls.append(col)
        mark = ""
        if e.get("correct") is False:
            mark = f'* (l>={e["wrong_from_degree"]})'
        rows[key][col] = f"{ns:.3g}{mark}"
        rows[key]["_" + col] = ns
    if not rows:
        return ""
    order = sorted(impls, key=lambda c: (not c.startswith("locdiff"), c))
    lines = ["| device | dtype | L | " + " | ".join(order) + " | sphericart / locdiff (fwd) |",
             "|---" * (len(order) + 4) + "|"]
    for key in sorted(rows):
        r = rows[key]
        ratio = ""
        if "_locdiff fwd" in r and "_sphericart fwd" in r:
            ratio = f'{r["_sphericart fwd"] / r["_locdiff fwd"]:.2f}x'
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(r.get(c, "") for c in order)
                     + f" | {ratio} |")
    return "\n".join(lines)


def _rows_by_impl(benchmarks, op, key, value):
    """``({key(extra_info): {impl: value(benchmark)}}, impls in order of appearance)`` of the
    benchmarks of ``op``."""
    rows, impls = collections.defaultdict(dict), []
    for b in benchmarks:
        e = b["extra_info"]
        if e.get("op") != op:
            continue
        if e["impl"] not in impls:
            impls.append(e["impl"])
        rows[key(e)][e["impl"]] = value(b)
    return rows, impls


def timing_table(benchmarks, op):
    """ms per call of every impl of ``op`` ("decode", "kl") per (device, dtype, L, B)."""
    rows, impls = _rows_by_impl(benchmarks, op, lambda e: (e["device"], e["dtype"], e["degree"], e["items"]),
                                lambda b: f'{b["stats"]["min"] * 1e3:.3g}')
    if not rows:
        return ""
    ratio = "th-isht" in impls and "locdiff" in impls
    lines = ["| device | dtype | L | B | " + " | ".join(f"{i} (ms)" for i in impls)
             + (" | th-isht / locdiff" if ratio else "") + " |",
             "|---" * (len(impls) + 4 + ratio) + "|"]
    for key in sorted(rows):
        r = rows[key]
        cells = " | ".join(r.get(i, "") for i in impls)
        if ratio:
            cells += " | " + (f'{float(r["th-isht"]) / float(r["locdiff"]):.2f}x'
                              if "th-isht" in r and "locdiff" in r else "")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {cells} |")
    return "\n".join(lines)


def train_table(benchmarks):
    """Samples/s of every impl of the training step per (device, L, threads), with training's
    optimiser against torch's default AdamW (``eager`` / ``eager-plain-adamw``)."""
    rows, impls = _rows_by_impl(benchmarks, "train_step", lambda e: (e["device"], e["degree"], e.get("threads", "")),
                                lambda b: b["extra_info"]["samples_per_s"])
    if not rows:
        return ""
    lines = ["| device | L | threads | " + " | ".join(f"{i} (samples/s)" for i in impls)
             + " | eager / eager-plain-adamw |", "|---" * (len(impls) + 4) + "|"]
    for key in sorted(rows, key=str):
        r = rows[key]
        ratio = f'{r["eager"] / r["eager-plain-adamw"]:.2f}x' if r.get("eager") and r.get("eager-plain-adamw") else ""
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(str(r.get(i, "")) for i in impls)
                     + f" | {ratio} |")
    return "\n".join(lines)


def tables(benchmarks):
    """Every table the benchmarks of one JSON give."""
    return [t for t in (sh_table(benchmarks), timing_table(benchmarks, "decode"), timing_table(benchmarks, "kl"),
                        train_table(benchmarks)) if t]


def main(path):
    with open(path) as f:
        data = json.load(f)
    info = data.get("machine_info", {})
    print(f'<!-- {path}: {info.get("cpu", {}).get("brand_raw", "")}, commit {data.get("commit_info", {}).get("id", "")[:10]} -->')
    for table in tables(data["benchmarks"]):
        print(table)
        print()


if __name__ == "__main__":
    main(sys.argv[1])
