"""Ratios, the summary over repetitions, the stdout table, the JSON record, machine and code facts
and the threads plot of a bench run."""
from __future__ import annotations

import importlib
import io
import json
import os
import platform
import statistics
import subprocess
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


# figures of a measurement summarised over its repetitions (median, min, max); the ratios are
# each repetition's own (taken against the baseline and synthetic rows of the same repetition)
SUMMARISED = ("images_per_s", "vs_baseline", "vs_synthetic", "cpu_cores", "cpu_ms_per_image",
              "seconds", "iters", "setup_s", "wall_s")
PEAKS = ("host_rss_peak_mb", "device_torch_peak_mb", "device_used_peak_mb")


def summarise(measurements: Sequence[dict]) -> List[dict]:
    """One row per (row name, threads), in first-measured order: each ``SUMMARISED`` figure as the
    median over the repetitions that measured it, with ``<figure>_min`` / ``_max``; memory peaks
    as their maximum; ``repetitions`` counted; the first error, if any repetition failed."""
    groups: Dict[tuple, List[dict]] = {}
    for m in measurements:
        groups.setdefault((m["name"], m["threads"]), []).append(m)
    rows = []
    for reps in groups.values():
        row = {k: v for k, v in reps[0].items() if k != "repetition"}
        row["repetitions"] = len(reps)
        row["error"] = next((r["error"] for r in reps if r.get("error")), None)
        for key in SUMMARISED:
            values = [r[key] for r in reps if r.get(key) is not None and not r.get("error")]
            row[key] = statistics.median(values) if values else None
            row[f"{key}_min"] = min(values) if values else None
            row[f"{key}_max"] = max(values) if values else None
        for key in PEAKS:
            values = [r[key] for r in reps if r.get(key) is not None]
            row[key] = max(values) if values else None
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Table.

COLUMNS = (  # header, row key, format
    ("row", "name", "{}"),
    ("threads", "threads", "{}"),
    ("of", "thread_kind", "{}"),
    ("views", "views", "{}"),
    ("images/s", "images_per_s", "{:.1f}"),
    ("min-max", "images_per_s", "range"),
    ("x baseline", "vs_baseline", "{:.2f}"),
    ("min-max", "vs_baseline", "range2"),
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
    if fmt.startswith("range"):
        low, high = row.get(f"{key}_min"), row.get(f"{key}_max")
        if low is None or high is None:
            return "-"
        digits = 2 if fmt == "range2" else 1
        return f"{low:.{digits}f}-{high:.{digits}f}"
    return "-" if value is None else fmt.format(value)


def table(rows: Sequence[dict]) -> str:
    """A fixed-width text table, one line per (row, threads): medians over the repetitions and
    their min-max."""
    cells = [[h for h, _, _ in COLUMNS]] + [[_cell(r, k, f) for _, k, f in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    fmt = lambda line: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                 for i, (c, w) in enumerate(zip(line, widths)))
    out = [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in cells[1:]]
    errors = [f"{r['name']} (threads {r['threads']}): {r['error']}" for r in rows if r.get("error")]
    base = next((r["baseline_row"] for r in rows if r.get("baseline_row")), None)
    reps = max((r.get("repetitions", 1) for r in rows), default=1)
    notes = ["threads: DALI threads (dali), DataLoader worker processes (workers) or torch's "
             "threads (torch, CPU only); '-': measured once",
             f"images/s and x ...: median of {reps} repetition(s), min-max beside; ratios are "
             f"taken within each repetition; x baseline: over the {base or 'reference'} row "
             f"with as many views",
             "CPU cores / CPU ms/image: CPU time of the process and its workers in the timed window, "
             "per second / per source image ('-': window too short for the CPU-time counters)"]
    return "\n".join(out + [f"error: {e}" for e in errors] + notes)


def caption(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    where = m.get("gpu") or m.get("cpu_model") or "CPU"
    code = result.get("code") or {}
    measured = code.get("commit") or code.get("version") or "?"
    return (f"{s['device'].upper()} ({where}, {m['cpu_count']} CPUs), code {measured[:12]}"
            f"{' (modified)' if code.get('dirty') else ''}, {s['image_size']} px, batch "
            f"{s['batch_size']}, {s['warmup']} warm-up batches + the prefetch queue, then >= "
            f"{s['iters']} timed batches over >= {s.get('min_seconds', 0):g} s a row (DataLoader "
            f"rows: whole rounds of their workers), {s.get('repeats', 1)} repetition(s) of all "
            f"rows interleaved, backend {s['backend']}, model {s['arch']}; images/s = source "
            f"images (a JSD sample is 3 views)")


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


def code_version() -> Dict[str, object]:
    """What was measured: the package's version and, where it runs from a git checkout, the
    commit (``dirty``: tracked files changed since); ``DALI_IPMIX_COMMIT`` names the commit of a
    copy without its .git (e.g. a tree carried to a GPU machine)."""
    import dali_ipmix
    root = Path(dali_ipmix.__file__).resolve().parent.parent
    commit, dirty = None, None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=20)
        if head.returncode == 0:
            commit = head.stdout.strip()
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                     "--untracked-files=no"], capture_output=True, text=True,
                                    timeout=20)
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    if commit is None and os.environ.get("DALI_IPMIX_COMMIT"):
        commit = os.environ["DALI_IPMIX_COMMIT"]
    return {"commit": commit, "dirty": dirty, "version": dali_ipmix.__version__,
            "source": str(root)}


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
        pts = sorted((r["threads"], r["images_per_s"], r.get("images_per_s_min") or r["images_per_s"],
                      r.get("images_per_s_max") or r["images_per_s"]) for r in rows
                     if r["name"] == name and r["threads"] is not None)
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                        yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                        marker="o", label=name, color=color, capsize=3)
        for r in rows:            # rows measured once (GPU: kernels, model step): a level line
            if r["name"] == name and r["threads"] is None:
                ax.axhline(r["images_per_s"], linestyle="--", linewidth=1, color=color,
                           label=f"{name} (measured once)")
    threads = sorted({r["threads"] for r in rows if r["threads"] is not None})
    ax.set_xticks(threads or [1])
    ax.set_yscale("log")
    ax.set_xlabel("CPU threads (DALI threads / DataLoader workers / torch threads)")
    ax.set_ylabel("source images / s")
    s, m = result["settings"], result["machine"]
    ax.set_title(f"{s['device'].upper()} ({m.get('gpu') or m.get('cpu_model') or 'CPU'}, "
                 f"{m['cpu_count']} CPUs): {s['image_size']} px, batch {s['batch_size']}, "
                 f"backend {s['backend']}, model {s['arch']}; median and min-max of "
                 f"{s.get('repeats', 1)} repetition(s)", fontsize=9)
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
