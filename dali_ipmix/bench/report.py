"""Ratios, the stdout table, the JSON record, machine facts and the threads plot of a bench run."""
from __future__ import annotations

import importlib
import io
import json
import os
import platform
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from dali_ipmix.errors import UserError

# views per source image -> the row the ratios are taken against: the official code when it was
# measured, else the package's reference DataLoader
BASELINES = ({1: "official", 3: "official-jsd"}, {1: "reference", 3: "reference-jsd"})
SYNTHETIC_ROW = "synthetic"
OUTPUT_FILES = ("bench.json", "bench.txt", "bench.png")


def add_ratios(rows: List[dict]) -> List[dict]:
    """Give every row ``vs_baseline`` and ``vs_synthetic``: its images/s over the rate of the
    baseline row with as many views per image (``official``/``official-jsd`` if measured, else
    ``reference``/``reference-jsd``) and of the ``synthetic`` row, from the same run.  The
    baseline is taken at the same thread count where it was measured there, else at its fastest
    (``baseline_threads`` says which); ``None`` where the row or its baseline failed or is
    missing."""
    measured = {}
    for r in rows:
        if r.get("images_per_s"):
            measured.setdefault(r["name"], {})[r["threads"]] = r["images_per_s"]

    def pick(name, threads):
        rates = measured.get(name)
        if not rates:
            return None, None
        if threads in rates:
            return threads, rates[threads]
        best = max(rates, key=rates.get)
        return best, rates[best]

    baselines = next((b for b in BASELINES if any(n in measured for n in b.values())), BASELINES[-1])
    for r in rows:
        r["baseline_row"] = baselines.get(r["views"])
        r["synthetic_row"] = SYNTHETIC_ROW
        r["baseline_threads"], base = pick(r["baseline_row"], r["threads"])
        _, synth = pick(SYNTHETIC_ROW, r["threads"])
        value = r.get("images_per_s")
        r["vs_baseline"] = value / base if value and base else None
        r["vs_synthetic"] = value / synth if value and synth else None
    return rows


# ---------------------------------------------------------------------------------------------
# Table.

COLUMNS = (  # header, row key, format
    ("row", "name", "{}"),
    ("threads", "threads", "{}"),
    ("of", "thread_kind", "{}"),
    ("views", "views", "{}"),
    ("images/s", "images_per_s", "{:.1f}"),
    ("x baseline", "vs_baseline", "{:.2f}"),
    ("x synthetic", "vs_synthetic", "{:.2f}"),
    ("CPU cores", "cpu_cores", "{:.2f}"),
    ("CPU ms/image", "cpu_ms_per_image", "{:.1f}"),
    ("host peak MiB", "host_rss_peak_mb", "{:.0f}"),
    ("device peak MiB", "device_torch_peak_mb", "{:.0f}"),
    ("set-up s", "setup_s", "{:.1f}"),
)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if key == "images_per_s" and row.get("error"):
        return "error"
    return "-" if value is None else fmt.format(value)


def table(rows: Sequence[dict]) -> str:
    """A fixed-width text table, one line per (row, threads)."""
    cells = [[h for h, _, _ in COLUMNS]] + [[_cell(r, k, f) for _, k, f in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    fmt = lambda line: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                 for i, (c, w) in enumerate(zip(line, widths)))
    out = [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in cells[1:]]
    errors = [f"{r['name']} (threads {r['threads']}): {r['error']}" for r in rows if r.get("error")]
    base = next((r["baseline_row"] for r in rows if r.get("baseline_row")), None)
    notes = ["threads: DALI threads (dali) or DataLoader worker processes (workers); '-': none",
             f"x baseline: images/s over the {base or 'reference'} row with as many views",
             "CPU cores / CPU ms/image: CPU time of the process and its workers in the timed window, "
             "per second / per source image"]
    return "\n".join(out + [f"error: {e}" for e in errors] + notes)


def caption(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    where = m.get("gpu") or m.get("cpu_model") or "CPU"
    return (f"{s['device'].upper()} ({where}, {m['cpu_count']} CPUs), {s['image_size']} px, batch "
            f"{s['batch_size']}, {s['warmup']} warm-up + {s['iters']} timed batches (DataLoader rows: "
            f"whole rounds of their workers), backend "
            f"{s['backend']}, model {s['arch']}; images/s = source images (a JSD sample is 3 views)")


# ---------------------------------------------------------------------------------------------
# Machine facts.

def _version(module: str) -> Optional[str]:
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None


def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info(device: str) -> Dict[str, object]:
    import psutil
    import torch
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "memory_gb": round(psutil.virtual_memory().total / 2 ** 30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(module) for name, module in (
            ("torch", "torch"), ("torchvision", "torchvision"), ("nvidia-dali", "nvidia.dali"),
            ("numpy", "numpy"), ("pillow", "PIL"), ("psutil", "psutil"))},
        "gpu": None, "cuda": None,
    }
    if device == "gpu":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------------------------------------
# Files.

def check_out_dir(out, overwrite: bool) -> Path:
    """Refuse (before any measurement) to replace a previous run's files without ``--overwrite``,
    and a folder that cannot be created or written into."""
    from dali_ipmix.outputs import check_output_folder
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose another folder")
    taken = [name for name in OUTPUT_FILES if (out / name).exists()]
    if taken and not overwrite:
        raise UserError(f"--out {out} already holds {', '.join(taken)}; pass --overwrite to replace "
                        f"them or choose another folder")
    return check_output_folder(out, "--out")


def write_json(result: dict, path) -> Path:
    from dali_ipmix.outputs import write_atomic
    return write_atomic(path, json.dumps(result, indent=2) + "\n")


def plot_png(result: dict, path) -> Path:
    """images/s against CPU threads, one line per row (log scale: the rows span decades)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r.get("images_per_s")]
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for i, name in enumerate(dict.fromkeys(r["name"] for r in rows)):
        color = f"C{i % 10}"
        pts = sorted((r["threads"], r["images_per_s"]) for r in rows
                     if r["name"] == name and r["threads"] is not None)
        if pts:
            ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=name, color=color)
        for r in rows:            # rows that use no CPU threads: a level line
            if r["name"] == name and r["threads"] is None:
                ax.axhline(r["images_per_s"], linestyle="--", linewidth=1, color=color,
                           label=f"{name} (no CPU threads)")
    threads = sorted({r["threads"] for r in rows if r["threads"] is not None})
    ax.set_xticks(threads or [1])
    ax.set_yscale("log")
    ax.set_xlabel("CPU threads (DALI threads / DataLoader workers)")
    ax.set_ylabel("source images / s")
    s, m = result["settings"], result["machine"]
    ax.set_title(f"{s['device'].upper()} ({m.get('gpu') or m.get('cpu_model') or 'CPU'}, "
                 f"{m['cpu_count']} CPUs): {s['image_size']} px, batch {s['batch_size']}, "
                 f"backend {s['backend']}, model {s['arch']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if rows:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    from dali_ipmix.outputs import write_atomic
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return write_atomic(path, png.getvalue())


def write_outputs(result: dict, out, plot: bool = True) -> Tuple[List[Path], List[str]]:
    """bench.json, bench.txt (caption + table) and, with ``plot``, bench.png into ``out`` (checked
    beforehand): (written paths, "file (reason)" of each write that failed).  Each file is written
    whole or not at all, and a failure (disk full) does not stop the others: the JSON matters
    most.  A record with ``complete`` False (a run still going) is marked as partial."""
    from dali_ipmix.outputs import write_atomic
    out = Path(out)
    partial = "" if result.get("complete", True) else "(partial: the run is still going)\n"
    writers = [("bench.json", lambda p: write_json(result, p)),
               ("bench.txt", lambda p: write_atomic(
                   p, partial + caption(result) + "\n\n" + table(result["rows"]) + "\n"))]
    if plot:
        writers.append(("bench.png", lambda p: plot_png(result, p)))
    written, failed = [], []
    for name, write in writers:
        try:
            written.append(write(out / name))
        except OSError as e:
            failed.append(f"{out / name} ({e.strerror or e})")
    return written, failed
