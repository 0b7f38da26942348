"""``dali-ipmix doctor``: versions, devices, and whether a tiny training pipeline builds, runs
and agrees with the reference on every device and pixel backend here.

Exit code 0 when every check that applies passes, 1 when one fails.
"""
from __future__ import annotations

import io
import os
import platform
import shutil
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import List, Tuple

import numpy as np

import pipelines
from . import _common

# The smoke-test pipeline: the ImageNet graph at 32 px with one chain of one step, so that the
# readable backend's graph builds in seconds; JSD on, so every output path is exercised.
SMOKE = dict(k=1, t=1, image_size=32, jsd=True)
SMOKE_BATCH = 2
# The same bound as tests/test_pipeline.py: equalize and bilinear rounding differ slightly.
SMOKE_TOLERANCE = 0.02
HW_DECODER_GPUS = "A100, A30, H100, H200, B200 and other data-centre GPUs with NVJPG engines"


def _version(module: str) -> str:
    try:
        mod = __import__(module, fromlist=["__version__"])
        return getattr(mod, "__version__", "?")
    except Exception as e:           # not installed or broken: say which
        return f"not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def _dali_cuda() -> str:
    try:
        import nvidia.dali as dali
        code = str(getattr(dali, "__cuda_version__", ""))
        # DALI writes the toolkit version without dots (12.9.86 -> 12986)
        return f"CUDA {code[:2]}.{code[2]}.{code[3:]}" if len(code) == 5 else f"CUDA code {code or '?'}"
    except Exception:
        return "?"


def _cudnn(v: int) -> str:
    # cuDNN >= 9 encodes major*10000 + minor*100 + patch, older ones major*1000 + minor*100 + patch
    major, rest = divmod(v, 10000) if v >= 90000 else divmod(v, 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def _driver() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "none (nvidia-smi not found)"
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.split()
        return out[0] if out else "unknown"
    except Exception as e:
        return f"unknown (nvidia-smi failed: {type(e).__name__})"


def gpus() -> List[str]:
    try:
        import torch
        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(f"{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
        return out
    except Exception as e:
        return [f"torch cannot list GPUs ({type(e).__name__}: {e})"]


def hardware_jpeg_decoder(gpu: bool) -> Tuple[str, str]:
    """(status, explanation) of the GPU's hardware JPEG decoder, tried through nvImageCodec (the
    library DALI's mixed decoders use) with its hardware backend only."""
    if not gpu:
        return "n/a", "no GPU: JPEGs are decoded on the CPU (libjpeg-turbo); the hardware decoder needs a GPU"
    try:
        from PIL import Image
        from nvidia import nvimgcodec
        buf = io.BytesIO()
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        decoder = nvimgcodec.Decoder(device_id=0, backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)])
        image = decoder.decode(nvimgcodec.CodeStream(buf.getvalue()))
    except Exception as e:
        return "unknown", f"could not try it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if image is None:
        return "no", (f"nvImageCodec's hardware backend declined a baseline JPEG: this GPU has none "
                      f"({HW_DECODER_GPUS} have one); the mixed decoder uses CUDA nvJPEG")
    return "yes", ("available, and used: the training graph gives it hw_decoder_load=0.65 of each batch "
                   "(readers.train_images); the rest is decoded by CUDA nvJPEG")


def environment() -> List[Tuple[str, str]]:
    import sys
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("nvidia-dali", f"{_version('nvidia.dali')} (built for {_dali_cuda()})"),
        ("torch", _version("torch")),
        ("torchvision", _version("torchvision")),
        ("numpy / pillow", f"{_version('numpy')} / {_version('PIL')}"),
    ]
    try:
        import torch
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        rows.append(("torch CUDA", f"{torch.version.cuda or 'none (CPU build)'}" + (f", cuDNN {_cudnn(cudnn)}" if cudnn else "")))
    except Exception:
        pass
    rows.append(("CUDA driver", _driver()))
    listed = gpus()
    rows.append(("GPUs", "none" if not listed else listed[0]))
    rows += [("", g) for g in listed[1:]]
    rows.append(("CPU cores", f"{affinity} usable of {os.cpu_count()}"))
    dot = shutil.which("dot")
    rows.append(("graphviz dot", dot or "not found (dali-ipmix graph writes DOT only; apt-get install graphviz)"))
    return rows


# ---------------------------------------------------------------------------------------------
# Smoke tests.

def smoke_test(data, mixing, device: str, backend: str) -> Tuple[bool, str]:
    """Build and run one batch of the training pipeline, replay it through the reference."""
    from .. import reference as R
    cfg = _common.make_config("imagenet", **SMOKE)
    start = time.perf_counter()
    try:
        pipe = _common.train_pipeline(data, mixing, cfg, "imagenet", batch_size=SMOKE_BATCH, device=device,
                                      backend=backend, seed=0, extra_outputs=True)
        pipe.build()
        views, _, crops, pics, tapes = (pipelines.samples(o) for o in pipe.run())
        took = time.perf_counter() - start
        diffs = [float(np.abs(views[b] - R.ipmix_views(crops[b], pics[b], tapes[b], cfg)).mean())
                 for b in range(SMOKE_BATCH)]
    except Exception as e:
        last = traceback.extract_tb(e.__traceback__)[-1]
        msg = str(e).strip().splitlines()
        return False, f"{type(e).__name__}: {msg[0] if msg else ''} (at {Path(last.filename).name}:{last.lineno})"
    worst = max(diffs)
    detail = f"built and ran a batch in {took:.1f} s; reference replay mean |diff| {worst:.4f}"
    if not np.isfinite(worst) or worst > SMOKE_TOLERANCE:
        return False, detail + f" > {SMOKE_TOLERANCE}: the output does not match the reference"
    return True, detail


def run_checks(devices, backends, log=print) -> List[Tuple[str, str, str, str]]:
    """(status, device, backend, message) for every device x backend."""
    from ._tiny_data import make_tiny_data
    results = []
    with tempfile.TemporaryDirectory(prefix="dali-ipmix-doctor-") as tmp:
        data, mixing = make_tiny_data(Path(tmp) / "data")
        for device in devices:
            for backend in backends:
                ok, msg = smoke_test(data, mixing, device, backend)
                results.append(("ok" if ok else "FAIL", device, backend, msg))
                log(f"  {results[-1][0]:<5} {device:<4} {backend:<6} {msg}")
    return results


def _run(args) -> int:
    print("dali-ipmix doctor")
    for name, value in environment():
        print(f"  {name:<15} {value}")
    gpu = _common.has_gpu()
    status, why = hardware_jpeg_decoder(gpu)
    print(f"  {'HW JPEG decode':<15} {status}: {why}")
    print(f"checks: one batch of the imagenet training graph (k={SMOKE['k']}, t={SMOKE['t']}, "
          f"{SMOKE['image_size']} px, batch {SMOKE_BATCH}) on generated data, replayed through the reference")
    devices = ["cpu"] + (["gpu"] if gpu else [])
    results = run_checks(devices, args.backends)
    if not gpu:
        print("  skip  gpu  all    no CUDA GPU visible (DALI sees 0 devices)")
    failed = [r for r in results if r[0] != "ok"]
    print(f"doctor: {len(results) - len(failed)} of {len(results)} checks ok" + (", FAILED: " + ", ".join(
        f"{d}/{b}" for _, d, b, _ in failed) if failed else ""))
    return 1 if failed else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "doctor", help="print versions and devices; check a tiny pipeline on every device and backend",
        description="Print the versions of DALI, torch, torchvision, CUDA and the driver, the GPUs, the "
                    "hardware JPEG decoder and CPU count; then build and run a tiny training pipeline on the "
                    "CPU (and the GPU where there is one) with each pixel backend, and compare it with the "
                    "reference.  Exit code 1 if a check fails.")
    p.add_argument("--backends", nargs="+", choices=("fused", "dali"), default=["fused", "dali"],
                   help="pixel backends to check (default: %(default)s)")
    p.set_defaults(func=_run)
