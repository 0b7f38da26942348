"""The fused backend alone: source images/s of the Triton kernels (and of the eager torch code for
comparison) on random images already on the device, with each stage's share of the time.

    python scripts/bench_kernels.py --batch 256 --out kernels.json          # on a GPU
    TRITON_INTERPRET=1 python scripts/bench_kernels.py --device cpu --batch 2 --size 32 --iters 1

Prints a table and writes JSON.  ``--blocks`` sweeps the pixels per program of the step and
finish kernels.  Needs torch and Triton only (no DALI).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dali_ipmix import config as C, fused, tape as T  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn, batch, iters, device):
    fn()                                     # warm-up: compilation, allocator
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return batch * iters / (time.perf_counter() - t0)


def _stages(x, f, u, cfg, dtype, iters, device):
    """Milliseconds per batch of decode, the k*t chain steps (tables + step), and finish."""
    from dali_ipmix import triton_kernels as TK
    tapes = TK.decode(u, cfg)
    out = {}
    for name, fn in (("decode", lambda: TK.decode(u, cfg)),
                     ("chains", lambda: TK.chains(x, f, tapes, cfg)),
                     ("finish", lambda: TK.finish(x, TK.chains(x, f, tapes, cfg), tapes, cfg,
                                                  dtype, False))):
        out[name] = 1000 * x.shape[0] / _rate(fn, x.shape[0], iters, device)
    out["finish"] -= out["chains"]           # finish was timed after its chains
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--impls", default="triton,torch")
    p.add_argument("--blocks", default=None, help="pixels per program to sweep, e.g. 128,256,512 "
                   "(default: the module's BLOCK_PIXELS)")
    p.add_argument("--warps", default=None, help="warps of the step kernel to sweep, e.g. 4,8 "
                   "(default: the module's STEP_WARPS)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    base = C.IMAGENET if args.size == 224 else C.IMAGENET.replace(
        image_size=args.size,
        patch_sizes=tuple(s for s in C.IMAGENET.patch_sizes if s < args.size) + (args.size,))
    gen = torch.Generator().manual_seed(0)
    S, B = args.size, args.batch
    x = torch.randint(0, 256, (B, S, S, 3), dtype=torch.uint8, generator=gen).to(device)
    f = torch.randint(0, 256, (B, S, S, 3), dtype=torch.uint8, generator=gen).to(device)
    rows = []
    for jsd in (False, True):
        cfg = base.replace(jsd=jsd)
        u = torch.rand((B, cfg.n_aug, T.uniform_size(cfg)), generator=gen).to(device)
        for impl in args.impls.split(","):
            shapes = [(None, None)]
            if impl == "triton":
                from dali_ipmix import triton_kernels as TK
                blocks = args.blocks.split(",") if args.blocks else [TK.BLOCK_PIXELS]
                warps = args.warps.split(",") if args.warps else [TK.STEP_WARPS]
                shapes = [(int(b), int(w)) for b in blocks for w in warps]
            for block, warps in shapes:
                if block:
                    TK.BLOCK_PIXELS, TK.STEP_WARPS = block, warps
                run = lambda: fused.ipmix_views_from_uniforms(x, f, u, cfg, dtype, impl=impl)  # noqa: E731
                iters = args.iters if impl == "triton" else max(1, args.iters // 5)
                row = {"views": cfg.views, "impl": impl, "block": block, "warps": warps,
                       "images_per_s": _rate(run, B, iters, device)}
                if impl == "triton":
                    row["stage_ms"] = _stages(x, f, u, cfg, dtype, iters, device)
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"batch": B, "size": S, "dtype": args.dtype, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "triton": _triton_version(),
              "python": platform.python_version(), "rows": rows}
    print(f"\n{'views':>5} {'impl':>6} {'block':>5} {'warps':>5} {'images/s':>10}  stage ms (decode / chains / finish)")
    for r in rows:
        st = r.get("stage_ms")
        stages = " / ".join(f"{st[k]:.2f}" for k in ("decode", "chains", "finish")) if st else "-"
        print(f"{r['views']:>5} {r['impl']:>6} {r['block'] or '-':>5} {r['warps'] or '-':>5} "
              f"{r['images_per_s']:>10.0f}  {stages}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
