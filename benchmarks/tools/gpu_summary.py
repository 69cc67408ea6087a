"""One screen from a run of benchmarks/gpu/run_all.sh: the tests' closing line, then per
spherical-harmonics case the output bandwidth (bytes written / median time) against the copy
bandwidth of the same run, then decode times with the speed-up over the anchors, and SHDD-KL
times. Reads the per-case JSON lines the benchmarks append as they finish
(LOCDIFF_BENCH_JSONL), so a stage cut short still shows.

    python benchmarks/tools/gpu_summary.py OUT_DIR
"""
from __future__ import annotations

import json
import pathlib

SIZES = {"float32": 4, "float64": 8}


def rows(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by the stage's timeout
    return out


def sh_lines(cases: list[dict]) -> list[str]:
    copy = next((c["extra_info"].get("copy_gbps_read_plus_write") for c in cases
                 if c["extra_info"].get("op") == "copy"), None)
    lines = [f"copy bandwidth (read + write): {copy} GB/s",
             f"{'impl':16} {'passes':8} {'L':>4} {'dtype':8} {'median ms':>10} {'out GB/s':>9} {'vs copy':>8} ok"]
    sh = [c for c in cases if c["extra_info"].get("op") == "sh"]
    sh.sort(key=lambda c: (c["extra_info"]["passes"], c["extra_info"]["degree"], c["extra_info"]["dtype"],
                           c["extra_info"]["impl"]))
    for c in sh:
        e, med = c["extra_info"], c["stats"]["median"]
        fwd = e["passes"] == "fwd"
        gbps = e["values"] * SIZES.get(str(e["dtype"]), 4) / med / 1e9
        frac = f"{gbps / copy:8.0%}" if copy and fwd else " " * 8
        bw = f"{gbps:9.1f}" if fwd else " " * 9
        ok = {True: "yes", False: "NO", None: "-"}[e.get("correct")]
        lines.append(f"{e['impl']:16} {e['passes']:8} {e['degree']:>4} {e['dtype']:8} {med * 1e3:10.3f} {bw} {frac} {ok}")
    return lines


def timing_lines(cases: list[dict], op: str) -> list[str]:
    """Per case the best time, and for decode how many times faster than the naive path
    and torch-harmonics' inverse SHT + argmax at the same degree and batch (the anchors)."""
    got = [c for c in cases if c["extra_info"].get("op") == op]
    if not got:
        return []
    best = {(c["extra_info"]["impl"], c["extra_info"]["degree"], c["extra_info"]["items"]): c["stats"]["min"]
            for c in got}
    anchors = ("naive", "th-isht") if op == "decode" else ()
    lines = [f"{op}: {'impl':16} {'L':>4} {'B':>5} {'min ms':>9}" + "".join(f" {'x ' + a:>9}" for a in anchors)]
    for c in sorted(got, key=lambda c: (c["extra_info"]["degree"], c["extra_info"]["items"], c["extra_info"]["impl"])):
        e, t = c["extra_info"], c["stats"]["min"]
        ratios = "".join(f" {best[(a, e['degree'], e['items'])] / t:9.1f}" if (a, e["degree"], e["items"]) in best
                         and a != e["impl"] else f" {'':9}" for a in anchors)
        lines.append(f"{'':{len(op) + 2}}{e['impl']:16} {e['degree']:>4} {e['items']:>5} {t * 1e3:9.3f}{ratios}")
    return lines


def main(out: pathlib.Path) -> None:
    tests = out / "tests.txt"
    if tests.exists():
        tail = [ln for ln in tests.read_text().splitlines() if ln.strip()]
        print("tests:", tail[-1] if tail else "(no output)")
    sh = rows(out / "sh_cuda.jsonl")
    shdd = rows(out / "shdd_cuda.jsonl") + rows(out / "decode_cuda.jsonl")
    print(f"benchmark cases recorded: {len(sh)} SH, {len(shdd)} decode / KL")
    for line in sh_lines(sh) + timing_lines(shdd, "decode") + timing_lines(shdd, "kl"):
        print(line)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="One screen from a run of benchmarks/gpu/run_all.sh.")
    ap.add_argument("out", nargs="?", default="gpu-out", help="the OUT folder of run_all.sh (default ./gpu-out)")
    main(pathlib.Path(ap.parse_args().out))
