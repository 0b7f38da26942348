"""``run_bench``: every selected row at every thread count, in this process, one after another;
the whole sequence repeated ``repeats`` times (rows interleaved), summarised by ``report``."""
from __future__ import annotations

import datetime
import gc
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from dali_ipmix import config as C
from dali_ipmix.bench import contenders as K
from dali_ipmix.bench.data import bench_data, check_folders
from dali_ipmix.bench.memory import PeakMemory
from dali_ipmix.bench.report import add_ratios, code_version, machine_info, summarise
from dali_ipmix.errors import UserError
from dali_ipmix.training.precision import AMP_MODES, resolve_amp

BACKENDS = ("fused", "dali")       # IPMix backends worth timing ("none" is the dali-plain row)


@dataclass(frozen=True)
class Row:
    name: str
    contender: str                 # the --contenders name that selects it
    jsd: bool                      # JSD triple (3 views per source image) or one view
    measure: Callable[[K.Setup, int], dict]     # (setup, threads) -> {"seconds", "setup_s"}
    backend: Optional[str]         # what makes the views; "setup" = the run's --backend
    threads: Optional[str]         # what its thread count is: "dali" (DALI num_threads, swept
    #                                over --threads), "workers" (DataLoader worker processes,
    #                                swept over --workers), "torch" (torch's intra-op threads:
    #                                swept over --threads on the CPU, measured once on GPU) or
    #                                None (measured once)

    @property
    def views(self) -> int:
        return 3 if self.jsd else 1


# Run order matters: the DataLoader rows fork their workers before DALI starts threads.
ROWS: Tuple[Row, ...] = (
    Row("official", "official", False, partial(K.official_pipeline, jsd=False), "official", "workers"),
    Row("official-jsd", "official", True, partial(K.official_pipeline, jsd=True), "official", "workers"),
    Row("reference", "reference", False, partial(K.reference_pipeline, jsd=False), "reference",
        "workers"),
    Row("reference-jsd", "reference", True, partial(K.reference_pipeline, jsd=True), "reference",
        "workers"),
    Row("dali-read", "dali-read", False, K.read_alone, None, "dali"),
    Row("dali-plain", "dali-plain", False, partial(K.dali_pipeline, jsd=False, backend="none"),
        "none", "dali"),
    Row("dali-tapes", "dali-draws", False,
        partial(K.dali_pipeline, jsd=False, backend="none", draws="tapes"), "none", "dali"),
    Row("dali-uniforms", "dali-draws", False,
        partial(K.dali_pipeline, jsd=False, backend="none", draws="uniforms"), "none", "dali"),
    Row("dali-ipmix", "dali-ipmix", False, partial(K.dali_pipeline, jsd=False), "setup", "dali"),
    Row("dali-ipmix-jsd", "dali-ipmix", True, partial(K.dali_pipeline, jsd=True), "setup", "dali"),
    Row("kernel", "kernel", False, partial(K.kernel_alone, jsd=False), "fused", "torch"),
    Row("kernel-jsd", "kernel", True, partial(K.kernel_alone, jsd=True), "fused", "torch"),
    Row("train", "train", True, K.train_pipeline_step, "setup", "dali"),
    Row("synthetic", "synthetic", True, K.synthetic_step, None, "torch"),
)
CONTENDERS = tuple(dict.fromkeys(r.contender for r in ROWS))
ROW_NAMES = tuple(r.name for r in ROWS)
MODEL_ROWS = ("train", "synthetic")
BUSY_LOAD = 0.5     # 1-minute load average above which the run is warned to be disturbed
# --iters, --min-seconds, --repeats when not given: on GPU long windows, repeated (the figures
# the project's goals are read from); on the CPU, where rows are slow, one short pass
TIMING_DEFAULTS = {"gpu": {"iters": 50, "min_seconds": 2.0, "repeats": 3},
                   "cpu": {"iters": 10, "min_seconds": 0.0, "repeats": 1}}
CPU_RESOLUTION = 0.1    # cores: the least CPU-time precision a window must allow to be reported


def select_rows(names: Optional[Sequence[str]]) -> Tuple[Row, ...]:
    """Rows named by contender (``dali-ipmix`` = both its rows) or by row name, in run order."""
    if not names:
        return ROWS
    unknown = [n for n in names if n not in CONTENDERS and n not in ROW_NAMES]
    if unknown:
        raise UserError(f"--contenders {','.join(unknown)}: unknown; choose from "
                        f"{', '.join(dict.fromkeys(CONTENDERS + ROW_NAMES))}")
    return tuple(r for r in ROWS if r.name in names or r.contender in names)


def thread_counts(row: Row, threads: Sequence[int], workers: Sequence[int],
                  device: str = "cpu") -> Sequence[int]:
    """The thread counts ``row`` is measured at: every count of its kind; rows on torch's threads
    only on the CPU (on GPU torch's threads launch kernels: measured once, at the first count)."""
    if row.threads == "workers":
        return workers
    return threads if swept(row, device) else threads[:1]


def swept(row: Row, device: str) -> bool:
    """Whether ``row``'s thread count is a setting of the measurement (shown in ``threads``)."""
    return row.threads is not None and not (row.threads == "torch" and device == "gpu")


def cpu_figures(cpu_s: Optional[float], seconds: Optional[float], images: int, processes: int,
                cores: int) -> Tuple[Optional[float], Optional[float]]:
    """(CPU cores kept busy, CPU ms per source image) over a timed window, or (None, None) where
    the window is too short for the counters: the kernel counts each process's user and system
    time in whole clock ticks (10 ms), so the difference of two readings is off by up to 2 ticks
    a process (a 2.5 ms window of one process read 3.96 cores on a 2-core machine).  Reported
    only where that error is under ``CPU_RESOLUTION`` cores, and never above the usable cores."""
    if cpu_s is None or not seconds:
        return None, None
    try:
        tick = 1.0 / os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        tick = 0.01
    if 2 * tick * max(processes, 1) / seconds > CPU_RESOLUTION:
        return None, None
    busy = min(cpu_s / seconds, cores)
    return busy, 1e3 * busy * seconds / images


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _dali_gpu_count() -> int:
    try:
        from nvidia.dali.backend import GetCUDADeviceCount
        return GetCUDADeviceCount()
    except Exception:
        return 0


def resolve_device(device: str) -> str:
    usable = torch.cuda.is_available() and _dali_gpu_count() > 0
    if device == "gpu" and not usable:
        raise UserError("--device gpu: no CUDA GPU usable by both PyTorch and DALI here; "
                        "use --device cpu")
    if device not in ("auto", "cpu", "gpu"):
        raise UserError(f"--device {device!r}: choose auto, cpu or gpu")
    return ("gpu" if usable else "cpu") if device == "auto" else device


def training_config(image_size: int) -> C.IPMixConfig:
    """The ImageNet recipe (JSD triple) at ``image_size``: patch sizes above it are dropped and the
    whole crop kept, as train.py does."""
    if image_size < 8:
        raise UserError(f"--image-size must be >= 8, got {image_size}")
    base = C.IMAGENET
    if image_size == base.image_size:
        return base
    return base.replace(image_size=image_size,
                        patch_sizes=tuple(sorted({p for p in base.patch_sizes if p < image_size}
                                                 | {image_size})))


def _check(threads, batch_size, warmup, iters, backend, amp, arch, rows, repeats=1,
           min_seconds=0.0) -> None:
    if not threads or any(int(t) < 1 for t in threads):
        raise UserError(f"--threads must be a list of integers >= 1, e.g. 1,2; got {threads}")
    for flag, value, low in (("--batch-size", batch_size, 1), ("--iters", iters, 1),
                             ("--warmup", warmup, 0), ("--repeats", repeats, 1)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if not 0 <= min_seconds <= 3600:          # also refuses nan and inf
        raise UserError(f"--min-seconds must be between 0 and 3600, got {min_seconds}")
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)} "
                        f"(the no-IPMix pipeline is the dali-plain row)")
    if amp not in AMP_MODES:
        raise UserError(f"--amp {amp!r}: choose one of {', '.join(AMP_MODES)}")
    if any(r.name in MODEL_ROWS for r in rows):
        import torchvision
        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise UserError(f"--arch {arch!r}: not a torchvision classification model "
                            f"(e.g. resnet50, resnet18)")


def _load_average():
    """(1, 5, 15)-minute load averages, or None where the OS has none: a busy machine shows here."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _release(cuda: bool) -> None:
    """Free what the last row left: pipelines, workers, cached device memory."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        try:
            from nvidia.dali.backend import ReleaseUnusedMemory
            ReleaseUnusedMemory()
        except Exception:  # pragma: no cover - older DALI
            pass


def measure_row(row: Row, setup: K.Setup, threads: int) -> dict:
    """One (row, threads) measurement with its memory peaks; an exception becomes ``error``."""
    cuda = setup.device == "gpu"
    old_threads = torch.get_num_threads()
    if not cuda:
        # on the CPU the fused kernel and the model step use torch's threads: give the row its
        # count; on GPU torch keeps its own (it launches kernels, DALI's threads do the CPU work)
        torch.set_num_threads(threads)
    error, timing = None, {}
    began = time.perf_counter()
    try:
        with PeakMemory(cuda=cuda) as memory:
            try:
                timing = row.measure(setup, threads)
            except UserError:
                raise
            except Exception as e:  # one failing row must not lose the others ...
                from dali_ipmix.verify import SEARCH_LIMIT, explain_pipeline_error
                bad_file = explain_pipeline_error(e, [setup.data.train_dir], [setup.data.mixing_dir],
                                                  search_limit=SEARCH_LIMIT, use="bench")
                if bad_file is not None:   # ... but a bad file stops every row: say which one
                    raise bad_file from None
                error = f"{type(e).__name__}: {e}".splitlines()[0]
    finally:
        torch.set_num_threads(old_threads)
        _release(cuda)
    seconds, iters, cpu = timing.get("seconds"), timing.get("iters", setup.iters), timing.get("cpu_s")
    cores, ms_per_image = cpu_figures(cpu, seconds, setup.batch_size * iters,
                                      timing.get("processes", 1), usable_cores())
    return {
        "name": row.name, "contender": row.contender,
        "threads": threads if swept(row, setup.device) else None, "thread_kind": row.threads,
        "torch_threads": threads if not cuda else old_threads, "views": row.views,
        "batch_size": setup.batch_size,
        "warmup": timing.get("warmup"), "iters": iters,
        "images_per_s": setup.batch_size * iters / seconds if seconds else None,
        "seconds": seconds, "setup_s": timing.get("setup_s"),
        # CPU time of the process and its workers over the timed window: cores kept busy, and
        # CPU per image (unlike images/s, hardly moved by other work on a shared machine)
        "cpu_s": cpu, "cpu_cores": cores, "cpu_ms_per_image": ms_per_image,
        "wall_s": time.perf_counter() - began,      # the whole row: set-up, warm-up, timing, freeing
        "backend": setup.backend if row.backend == "setup" else row.backend,
        "impl": timing.get("impl"),
        "arch": setup.arch if row.name in MODEL_ROWS else None,
        "amp": setup.amp if row.name in MODEL_ROWS else None,
        "device": setup.device, **memory.result(), "error": error,
    }


def run_bench(*, data=None, mixing=None, contenders: Optional[Sequence[str]] = None,
              threads: Sequence[int] = (os.cpu_count() or 1,), batch_size: int = 32,
              image_size: int = 224, warmup: int = 3, iters: Optional[int] = None,
              min_seconds: Optional[float] = None, repeats: Optional[int] = None,
              device: str = "auto",
              backend: str = "fused", hw_decoder_load: float = 0.65, arch: str = "resnet50",
              amp: str = "auto", channels_last: bool = False, gen_images: int = 256,
              gen_pictures: int = 64, gen_size: Optional[int] = None, gen_classes: int = 4,
              seed: int = 0, data_filelist=None, mixing_filelist=None,
              workers: Optional[Sequence[int]] = None, official=None,
              command: Optional[Sequence[str]] = None, log=print, on_row=None) -> Dict:
    """Measure the selected rows at every thread count on the same files, the whole sequence
    ``repeats`` times (rows interleaved); returns the record written to bench.json: ``settings``,
    ``code`` (the commit measured), ``machine``, ``data``, ``command``, ``measurements`` (every
    row, thread count and repetition, with its ratios to the baseline and synthetic rows of the
    same repetition) and ``rows`` (one per row and thread count: median, min and max over the
    repetitions, see ``report.summarise``).

    Each row is timed over at least ``iters`` batches and ``min_seconds`` (defaults:
    ``TIMING_DEFAULTS`` for the device) after ``warmup`` batches plus its prefetch queue.

    ``data``/``mixing``: class-folder set and mixing pictures; where missing, ``gen_images``
    sources ``gen_size`` px high (default: the Resize(256) of a 224 crop, scaled) and
    ``gen_pictures`` mixing pictures are generated into a temporary folder.  ``on_row``: called
    with the record so far (``complete`` False) after every measurement, so that a run cut short
    still leaves its rows.
    """
    rows = select_rows(contenders)
    if official is not None:
        from dali_ipmix.bench import official as O
        O.load(official)                                  # a bad checkout fails before any work
        if image_size != O.OFFICIAL_SIZE:
            raise UserError(f"--official: the official code crops {O.OFFICIAL_SIZE} px (its patch "
                            f"sizes reach {O.OFFICIAL_SIZE}); use --image-size {O.OFFICIAL_SIZE}")
    else:                         # the official rows need its code
        rows = tuple(r for r in rows if r.contender != "official")
        if not rows:
            raise UserError("--contenders official needs --official DIR (a checkout of "
                            "github.com/hzlsaber/IPMix)")
    threads = [int(t) for t in threads]
    workers = threads if workers is None else [int(w) for w in workers]
    if not threads or min(threads) < 1:
        raise UserError(f"--threads must be a list of integers >= 1, e.g. 1,2; got {threads}")
    if not workers or min(workers) < 1:
        raise UserError(f"--workers must be a list of integers >= 1, e.g. 2,16; got {workers}")
    device = resolve_device(device)
    timing = TIMING_DEFAULTS[device]
    iters = timing["iters"] if iters is None else iters
    min_seconds = timing["min_seconds"] if min_seconds is None else float(min_seconds)
    repeats = timing["repeats"] if repeats is None else repeats
    _check(threads, batch_size, warmup, iters, backend, amp, arch, rows, repeats, min_seconds)
    amp = resolve_amp(amp, gpu=device == "gpu")
    cfg = training_config(image_size)
    data, mixing = check_folders(data, mixing, data_filelist, mixing_filelist)   # listed once
    from pipelines import resize_for
    gen_size = gen_size or resize_for(image_size, "imagenet")
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_start = _load_average()
    if load_start and load_start[0] > BUSY_LOAD:
        log(f"bench: warning: the 1-minute load average is {load_start[0]:.2f} before starting; "
            f"other work on this machine slows the rows down unevenly")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dali-ipmix-bench-") as tmp:
        todo = [what for what, given in ((f"{gen_images} source images", data),
                                         (f"{gen_pictures} mixing pictures", mixing)) if not given]
        if todo:
            log(f"bench: generating {' and '.join(todo)} ({gen_size} px) ...")
        files = bench_data(tmp, data_dir=data, mixing_dir=mixing, images=gen_images,
                           pictures=gen_pictures, size=gen_size, classes=gen_classes, seed=seed,
                           data_filelist=data_filelist, mixing_filelist=mixing_filelist)
        setup = K.Setup(data=files, cfg=cfg, batch_size=batch_size, warmup=warmup, iters=iters,
                        device=device, backend=backend, hw_decoder_load=hw_decoder_load, arch=arch,
                        amp=amp, channels_last=channels_last, seed=seed,
                        official=None if official is None else str(official),
                        min_seconds=min_seconds)
        results, measured = [], []
        code = code_version()

        def record(complete: bool) -> Dict:
            return {
                "command": list(sys.argv if command is None else command),
                "argv": list(sys.argv),
                "started": started,
                "total_s": time.perf_counter() - start,
                "complete": complete,
                "settings": {"contenders": [r.name for r in rows], "threads": threads,
                             "workers": workers,
                             "official": None if official is None else str(official),
                             "batch_size": batch_size, "image_size": image_size, "warmup": warmup,
                             "warmup_note": "plus each row's prefetch queue: the rows' 'warmup' "
                                            "is what they used",
                             "iters": iters, "min_seconds": min_seconds, "repeats": repeats,
                             "device": device, "backend": backend,
                             "hw_decoder_load": hw_decoder_load, "arch": arch, "amp": amp,
                             "channels_last": channels_last, "seed": seed,
                             "ipmix": {"k": cfg.k, "t": cfg.t, "jsd_views": cfg.views,
                                       "patch_sizes": list(cfg.patch_sizes),
                                       "mixing_resize": setup.resize}},
                "code": code,
                "machine": {**machine_info(device), "load_average_start": load_start,
                            "load_average_end": _load_average()},
                "data": files.describe(),
                "measurements": measured,
                "rows": summarise(measured),
            }

        for rep in range(repeats):
            done = []
            for row in rows:
                for n in thread_counts(row, threads, workers, device):
                    log(f"bench: {row.name}, {n} thread(s), repetition {rep + 1}/{repeats} ...")
                    done.append({**measure_row(row, setup, n), "repetition": rep})
                    r = done[-1]
                    log(f"bench: {row.name}, {n} thread(s): " + (
                        f"error {r['error']}" if r["error"] else f"{r['images_per_s']:.1f} images/s"))
                    # ratios within this repetition only (the rows so far)
                    measured = results + add_ratios([dict(m) for m in done])
                    if on_row is not None:
                        on_row(record(complete=False))
            results += add_ratios(done)
            measured = list(results)
        return record(complete=True)
