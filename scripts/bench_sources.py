"""The same pictures from three data sources: local class folders, local tar shards
(``dali-ipmix shard``) and the same shards over a loopback S3 server (``moto_server`` on
127.0.0.1, from the test extra), each through ``dali-ipmix bench`` rows: ``dali-read`` (the
reader alone: what the storage delivers) and ``dali-ipmix`` (the IPMix loader); rows and sources
interleaved, repeated, median and spread reported (BENCHMARKS.md "Data sources").  CPU ms/image
counts the S3 server too (a child process of this one).

    python scripts/bench_sources.py --images 512 --repeats 3 --threads 2 --device cpu

Also ``--startup N``: the set-up time of a training run on N generated files (class folders, and
a file list of them): the data is listed once, by train.py's data check, whose record the
pipelines reuse.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dali_ipmix import s3, shard  # noqa: E402
from dali_ipmix.bench.data import write_pictures, write_sources  # noqa: E402
from dali_ipmix.bench.runner import run_bench  # noqa: E402


def loader_rows(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-sources-"))
    folders = write_sources(tmp / "train", args.images, args.size, args.classes)
    mixing = write_pictures(tmp / "mixing", args.pictures, args.size)
    shard.convert(folders, tmp / "shards", count=args.shards, log=lambda *a: None)
    where = {"folders": str(folders), "shards": str(tmp / "shards"), "s3-shards": "s3://bench/shards"}
    results = {(row, name): [] for row in args.rows for name in where}
    with s3.loopback_server() as endpoint:
        s3.upload_tree(tmp / "shards", "s3://bench/shards", endpoint)
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test",
                          AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1")
        for rep in range(args.repeats):
            for row_name in args.rows:
                for name, data in where.items():
                    record = run_bench(data=data, mixing=str(mixing), contenders=[row_name],
                                       threads=[args.threads], batch_size=args.batch_size,
                                       image_size=args.image_size, warmup=args.warmup,
                                       iters=args.iters, min_seconds=args.min_seconds,
                                       device=args.device, log=lambda m: None)
                    row = record["rows"][0]
                    if row["error"]:
                        raise SystemExit(f"{row_name} {name}: {row['error']}")
                    results[row_name, name].append(row)
                    print(f"repeat {rep + 1} {row_name:10s} {name:10s} {row['images_per_s']:8.1f} "
                          f"images/s  {row['cpu_ms_per_image'] or float('nan'):6.2f} CPU ms/image",
                          flush=True)
    return {f"{row} {name}": {"images_per_s": [r["images_per_s"] for r in rows],
                              "cpu_ms_per_image": [r["cpu_ms_per_image"] for r in rows]}
            for (row, name), rows in results.items()}


def startup(n: int, classes: int = 1000) -> dict:
    """Set-up seconds of ``train.py --max-steps 1`` (its summary's "setup": flags, data listing
    and check, model, pipelines built, first batches) on ``n`` training files in ``classes``
    class folders, from the folders and from a verified file list of them.  The files are hard
    links to one small JPEG per class: the listing is the real one, the disk holds few pictures."""
    import shutil
    import subprocess
    from PIL import Image
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    (tmp / "pictures").mkdir()
    Image.new("RGB", (48, 40), (90, 120, 200)).save(tmp / "one.jpg", quality=90)
    lines = []
    for c in range(classes):
        for split in ("train", "val"):
            (tmp / split / f"n{c:08d}").mkdir(parents=True)
        shutil.copy(tmp / "one.jpg", tmp / "pictures" / f"{c}.jpg")   # hard links per file are limited
        os.link(tmp / "pictures" / f"{c}.jpg", tmp / "val" / f"n{c:08d}" / "0.JPEG")
    for i in range(n):
        rel = f"n{i % classes:08d}/{i:07d}.JPEG"
        os.link(tmp / "pictures" / f"{i % classes}.jpg", tmp / "train" / rel)
        lines.append(f"{rel} {i % classes}\n")
    (tmp / "mixing").mkdir()
    for i in range(8):
        os.link(tmp / "one.jpg", tmp / "mixing" / f"{i}.jpg")
    (tmp / "list.txt").write_text("".join(lines))
    timings = {}
    root = Path(__file__).resolve().parent.parent
    for name, extra in (("class folders", []), ("file list", ["--train-filelist", str(tmp / "list.txt")])):
        run = subprocess.run([sys.executable, str(root / "train.py"), "--data-path", str(tmp),
                              "--mixing-set", str(tmp / "mixing"),
                              "--output-dir", str(tmp / f"run-{len(timings)}"),
                              "--arch", "resnet18", "--image-size", "32", "--batch-size", "8",
                              "--workers", "2", "--max-steps", "1", "--no-tensorboard", *extra],
                             capture_output=True, text=True)
        line = next((l for l in run.stdout.splitlines() if "setup" in l and "total" in l), None)
        if run.returncode or line is None:
            raise SystemExit(f"train.py failed: {run.stderr[-2000:]}")
        timings[name] = float(line.split("setup")[1].split("s")[0])
    return timings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--pictures", type=int, default=64)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="source height / mixing side (px)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--rows", default="dali-read,dali-ipmix", type=lambda v: v.split(","),
                   help="bench rows, each measured on the three sources (dali-read: the reader "
                        "alone, what the storage delivers; dali-ipmix: the IPMix loader)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--min-seconds", type=float, default=2.0, help="each row's shortest window")
    p.add_argument("--device", default="cpu")
    p.add_argument("--startup", type=int, default=0, metavar="N", help="also time listing N files")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    out = {"settings": vars(args)}
    if args.repeats:
        out["rows"] = loader_rows(args)
        for name, r in out["rows"].items():
            ips, ms = r["images_per_s"], r["cpu_ms_per_image"]
            ms = [m for m in ms if m is not None] or [float("nan")]
            print(f"{name:21s} images/s median {statistics.median(ips):7.1f} (min {min(ips):.1f}, "
                  f"max {max(ips):.1f})  CPU ms/image median {statistics.median(ms):6.1f} "
                  f"(min {min(ms):.1f}, max {max(ms):.1f})")
    if args.startup:
        out["startup_s"] = startup(args.startup)
        for name, t in out["startup_s"].items():
            print(f"train.py set-up on {args.startup} files from {name}: {t:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
