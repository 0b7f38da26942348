"""The same ``dali-ipmix bench`` rows on two commits, in one run: a structural change must leave
the figures within noise (issue 26's "before/after in one run").  CPU rows (``--device cpu``).

Each commit is checked out into a temporary worktree and its own ``dali-ipmix bench`` runs in a
child process (``PYTHONPATH`` = that worktree), on one generated data set shared by both; the
commits alternate ``--repeats`` times (before, after, after, before, ...: neither always runs
first), so load that drifts over the run falls on both.  Prints each row's median images/s and
CPU ms/image per commit with min-max, and after/before per row: the median of the ratios of the
pairs run back to back, with their spread.

    python scripts/bench_commits.py --before 53df7b6 --after HEAD --repeats 4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dali_ipmix.bench.data import write_pictures, write_sources  # noqa: E402


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def bench(tree: Path, out: Path, args, data: Path, mixing: Path) -> dict:
    cmd = [sys.executable, "-m", "dali_ipmix.cli", "bench", "--contenders", args.rows,
           "--device", "cpu", "--threads", str(args.threads), "--batch-size", str(args.batch_size),
           "--image-size", str(args.image_size), "--iters", str(args.iters),
           "--min-seconds", str(args.min_seconds), "--repeats", "1",
           "--data", str(data), "--mixing", str(mixing), "--out", str(out)]
    run = subprocess.run(cmd, cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)),
                         capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"bench at {tree} failed: {run.stderr[-2000:]}")
    return {r["name"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}


def spread(values) -> str:
    return f"{statistics.median(values):8.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="git revision measured as 'before'")
    p.add_argument("--after", default="HEAD", help="git revision measured as 'after'")
    p.add_argument("--rows", default="dali-plain,dali-ipmix,dali-ipmix-jsd,kernel,kernel-jsd")
    p.add_argument("--repeats", type=int, default=4, help="runs of each commit, alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--min-seconds", type=float, default=3.0)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--json", default=None, help="write every measurement here")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-commits-"))
    data = write_sources(tmp / "train", args.images, int(args.image_size * 1.15) + 1, 4)
    mixing = write_pictures(tmp / "mixing", 64, int(args.image_size * 1.15) + 1)
    commits = {"before": git("rev-parse", args.before), "after": git("rev-parse", args.after)}
    trees, machine = {}, None
    try:
        for name, sha in commits.items():
            trees[name] = tmp / name
            git("worktree", "add", "--detach", str(trees[name]), sha)
        runs = {name: [] for name in commits}
        for rep in range(args.repeats):
            order = ["before", "after"] if rep % 2 == 0 else ["after", "before"]
            for name in order:
                rows = bench(trees[name], tmp / f"out-{name}-{rep}", args, data, mixing)
                runs[name].append(rows)
                print(f"repeat {rep + 1} {name:6s} " + "  ".join(
                    f"{r}: {rows[r]['images_per_s']:.1f}" for r in args.rows.split(",")), flush=True)
    finally:       # nothing left behind, also when interrupted
        for tree in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           capture_output=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)
        machine = json.loads(next(tmp.glob("out-*/bench.json")).read_text())["machine"] \
            if any(tmp.glob("out-*/bench.json")) else None
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nbefore {commits['before'][:12]}, after {commits['after'][:12]}; CPU, {args.threads} "
          f"threads, batch {args.batch_size}, {args.image_size} px, {args.repeats} alternating runs "
          f"each; median (min-max)")
    print(f"{'row':15s} {'before img/s':>22s} {'after img/s':>22s} {'after/before':>22s} "
          f"{'CPU ms/img before':>22s} {'after':>22s}")
    summary = {}
    for row in args.rows.split(","):
        b = [r[row]["images_per_s"] for r in runs["before"]]
        a = [r[row]["images_per_s"] for r in runs["after"]]
        ratio = [x / y for x, y in zip(a, b)]
        cb = [r[row]["cpu_ms_per_image"] for r in runs["before"] if r[row]["cpu_ms_per_image"]]
        ca = [r[row]["cpu_ms_per_image"] for r in runs["after"] if r[row]["cpu_ms_per_image"]]
        summary[row] = {"before": b, "after": a, "ratio": ratio, "cpu_ms_before": cb, "cpu_ms_after": ca}
        print(f"{row:15s} {spread(b):>22s} {spread(a):>22s} {spread(ratio):>22s} "
              f"{spread(cb) if cb else '-':>22s} {spread(ca) if ca else '-':>22s}")
    if args.json:
        Path(args.json).write_text(json.dumps({"commits": commits, "settings": vars(args),
                                               "machine": machine, "rows": summary}, indent=1))


if __name__ == "__main__":
    main()
