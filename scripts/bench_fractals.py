#!/usr/bin/env python
"""Time the procedural mixing set: ``generate_fractals`` end to end, plus per-kind single-process costs.

    python scripts/bench_fractals.py                      # the paper-sized set: 13000 x 256 px
    python scripts/bench_fractals.py --count 1000 --jobs 2 --json runs/bench_fractals.json

The set is written to a temporary folder (removed afterwards unless --out is given).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

try:
    import dali_ipmix  # noqa: F401  (installed or on the path)
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from dali_ipmix.data import fractals as F  # noqa: E402
from dali_ipmix.data._io import resolve_jobs  # noqa: E402

PAPER_SET = 13_000
SAMPLE_PER_KIND = 40  # pictures timed one by one, in this process, for the per-kind rows


def _per_kind_ms(size: int, seed: int) -> dict:
    """Mean single-process milliseconds per picture of each kind (render only, no JPEG)."""
    F._mandelbrot_boundary()  # one-off table, built once per worker; keep it out of the mean
    out = {}
    for kind, render in (("ifs", F.render_ifs), ("orbit", F.render_orbit_trap)):
        start = time.perf_counter()
        for i in range(SAMPLE_PER_KIND):
            render(np.random.default_rng([seed, 10_000_000 + i]), size)
        out[kind] = 1e3 * (time.perf_counter() - start) / SAMPLE_PER_KIND
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=PAPER_SET)
    p.add_argument("--size", type=int, default=F.DEFAULT_SIZE)
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ifs-ratio", type=float, default=F.DEFAULT_IFS_RATIO)
    p.add_argument("--out", default=None, help="keep the set here instead of a temporary folder")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--skip-per-kind", action="store_true", help="only time the end-to-end run")
    args = p.parse_args(argv)

    jobs = resolve_jobs(args.jobs)
    load_before = os.getloadavg()
    per_kind = {} if args.skip_per_kind else _per_kind_ms(args.size, args.seed)

    with tempfile.TemporaryDirectory(prefix="bench_fractals_") as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "set"
        start = time.perf_counter()
        paths = F.generate_fractals(out, args.count, size=args.size, seed=args.seed, ifs_ratio=args.ifs_ratio,
                                    jobs=jobs, overwrite=bool(args.out))
        wall = time.perf_counter() - start
        total_bytes = sum(os.path.getsize(q) for q in paths)

    rate = len(paths) / wall if wall > 0 else float("nan")
    result = {
        "count": len(paths), "size": args.size, "jobs": jobs, "seed": args.seed, "ifs_ratio": args.ifs_ratio,
        "wall_s": wall, "images_per_s": rate, "ms_per_image_per_job": 1e3 * wall * jobs / max(len(paths), 1),
        "paper_set_projection_s": PAPER_SET / rate if rate > 0 else None,
        "mean_kib_per_image": total_bytes / 1024 / max(len(paths), 1),
        "single_process_render_ms": per_kind,
        "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
    }

    rows = [("images", f"{len(paths)} x {args.size}px (ifs ratio {args.ifs_ratio})"),
            ("jobs", f"{jobs} (of {os.cpu_count()} CPUs)"),
            ("wall time", f"{wall:.1f} s"),
            ("throughput", f"{rate:.1f} img/s"),
            ("per image per job", f"{result['ms_per_image_per_job']:.1f} ms"),
            (f"projected {PAPER_SET}", f"{result['paper_set_projection_s']:.0f} s"),
            ("mean file size", f"{result['mean_kib_per_image']:.1f} KiB")]
    rows += [(f"render {kind} (1 proc)", f"{ms:.1f} ms") for kind, ms in per_kind.items()]
    rows.append(("load avg before/after", f"{load_before[0]:.2f} / {result['loadavg_after'][0]:.2f}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
