#!/usr/bin/env python
"""Train an image classifier with IPMix augmentation fed by NVIDIA DALI.

In the style of torchvision's references/classification/train.py: one file, explicit flags.

The official IPMix ImageNet recipe (hzlsaber/IPMix imagenet.py) is the default: torchvision
ResNet-50, 224 px crops, SGD (momentum 0.9, Nesterov, wd 5e-4), lr 0.01 with a per-iteration cosine
schedule down to 1e-6*128/batch, 180 epochs, batch 128, the JSD consistency loss over
(clean, IPMix, IPMix) views::

    python train.py --data-path /data/imagenet --mixing-set /data/fractals --output-dir runs/rn50
    torchrun --nproc_per_node=8 train.py --data-path /data/imagenet --mixing-set /data/fractals \
        --batch-size 128 --lr-scale-batch 256 --output-dir runs/rn50

``--data-path DIR`` holds ``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg``.

Without data flags (``python train.py``) a small built-in demo runs instead: a synthetic
10-class set and a procedural fractal mixing set are generated once into a cache folder
(``$DALI_IPMIX_CACHE`` or ``~/.cache/dali_ipmix/demo``), then a small model (a ResNet-9 of width
16 at 32 px unless overridden) trains for 8 epochs with the recipe's IPMix + JSD, reaching 96-99 %
validation top-1 in about 1.5 minutes on 2 CPU cores (BENCHMARKS.md), and leaves a sheet of one
augmented batch and a plot of the curves in the output folder (``dali_ipmix/demo_outputs.py``).  It shows the whole path
(generation -> DALI IPMix -> training -> validation -> checkpoints), not the ImageNet recipe.

``--batch-size`` is per process (rank); the global batch is batch-size x world size.
Each rank runs its own DALI pipeline on its own shard (shard_id=rank) with its own seed.
Checkpoints hold the model, optimizer, scheduler, grad scaler, RNG states and the DALI pipeline
state of every rank, so ``--resume PATH`` (or ``--resume auto``) continues with the exact next
batch.  Errors in the user's input are reported as one line (exit code 2) before any work starts.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from dali_ipmix import advmixup
from dali_ipmix import config as C
from dali_ipmix import models
from dali_ipmix.cli import UserError
from dali_ipmix.losses import ipmix_loss
from dali_ipmix.outputs import write_atomic

CKPT_PATTERN = re.compile(r"^checkpoint_(\d+)\.pth$")
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
BEST_ROBUST = "best_robust.pth"

# Defaults that differ between the real recipe and the built-in demo (flags left unset).
RECIPE_DEFAULTS = dict(arch="resnet50", image_size=None, epochs=180, batch_size=128, lr=0.01,
                       warmup_epochs=0, print_freq=50, ckpt_every=1000, crop_scale=0.08,
                       lr_schedule="cosine", nesterov="on")
DEMO_DEFAULTS = dict(arch="resnet9_w16", image_size=32, epochs=8, batch_size=32, lr=0.02,
                     warmup_epochs=1, print_freq=20, ckpt_every=0, crop_scale=0.6,
                     lr_schedule="cosine", nesterov="on")
# --preset cifar-adv: the IPMix cifar preset, --adv-mixup aom, and the CIFAR-10 adversarial-training
# schedule of Rice et al. 2020 (locuslab/robust_overfitting train_cifar.py): PreActResNet-18, batch
# 128, 200 epochs, SGD momentum 0.9 without Nesterov, weight decay 5e-4 (the defaults here), lr 0.1
# divided by 10 at 50 % and by 100 at 75 % of training.
CIFAR_ADV_DEFAULTS = dict(arch="preactresnet18", image_size=32, epochs=200, batch_size=128, lr=0.1,
                          warmup_epochs=0, lr_schedule="piecewise", nesterov="off", adv_mixup="aom")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where the help does not say the default itself: None means the
    recipe, the demo or the preset decides, and the help names those."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser(description="IPMix + DALI classification training "
                                "(no data flags: built-in demo)", add_help=add_help,
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help="folder with train/ and val/ class folders "
                   "(omit for the built-in demo)")
    g.add_argument("--train-dir", default=None, help="training class folder (default DATA_PATH/train)")
    g.add_argument("--val-dir", default=None, help="validation class folder (default DATA_PATH/val)")
    g.add_argument("--mixing-set", default=None, help="folder of mixing pictures (fractals); "
                   "make one with `dali-ipmix fractals --out DIR --count N`")
    g.add_argument("--train-filelist", default=None, metavar="FILE", help="train only on the files "
                   "listed (`dali-ipmix verify TRAIN_DIR --write-filelist FILE` leaves out bad ones)")
    g.add_argument("--val-filelist", default=None, metavar="FILE", help="the same for validation")
    g.add_argument("--mixing-filelist", default=None, metavar="FILE",
                   help="the same for the mixing set (`dali-ipmix verify DIR --mixing --write-filelist FILE`)")
    g.add_argument("--mixing-cache-mb", type=int, default=None, metavar="MB",
                   help="GPU memory for the decoded mixing pictures, so each is decoded once "
                   "(default: enough for the whole set, at most 4096; 0: decode every time)")
    g.add_argument("--demo-cache", default=None, help="cache folder of the demo data "
                   "(default $DALI_IPMIX_CACHE or ~/.cache/dali_ipmix/demo)")
    g.add_argument("--workers", "-j", type=int, default=4, help="DALI CPU threads per rank")
    g.add_argument("--last-batch", choices=("drop", "partial", "fill"), default="drop",
                   help="what to do with the last incomplete training batch of an epoch "
                   "(validation always uses 'partial', so padding is never counted)")
    g.add_argument("--crop-scale", type=float, default=None, metavar="MIN",
                   help="smallest RandomResizedCrop area fraction (recipe 0.08 as torchvision; demo 0.6: "
                   "its pictures hold one object, which small crops cut off)")
    g.add_argument("--val-batch-size", type=int, default=None, help="validation batch (default: --batch-size)")

    g = p.add_argument_group("IPMix")
    g.add_argument("--preset", choices=sorted(C.PRESETS) + ["cifar-adv"], default="imagenet",
                   help="IPMix hyperparameters; cifar-adv = cifar with --adv-mixup aom and Rice et al.'s "
                   "adversarial-training schedule (docs/adversarial.md)")
    g.add_argument("--image-size", type=int, default=None,
                   help="crop size (recipe 224, demo 32); patch sizes above it are dropped and it is added")
    g.add_argument("--backend", choices=("fused", "dali", "none"), default=None,
                   help="IPMix implementation inside the DALI graph (default fused; 'dali' if the fused "
                   "kernel cannot be imported); 'none' = no augmentation")
    g.add_argument("--no-jsd", action="store_true", help="one IPMix view and plain cross-entropy "
                   "(default: clean + 2 IPMix views with the JSD consistency loss; with --adv-mixup "
                   "one view unless --adv-jsd)")
    g.add_argument("--jsd-weight", type=float, default=12.0, help="weight of the JSD term (official 12)")
    g.add_argument("--k", type=int, default=None, help="IPMix chains (preset: 3)")
    g.add_argument("--t", type=int, default=None, help="max chain depth (preset: 3)")
    g.add_argument("--beta", type=float, default=None, help="add/multiply mixing strength (preset)")
    g.add_argument("--aug-severity", type=float, default=None, help="image-op severity (preset)")
    g.add_argument("--all-ops", action="store_true", help="also use the ImageNet-C-overlapping ops")

    g = p.add_argument_group("model and optimisation")
    g.add_argument("--arch", "-a", default=None, help="any torchvision classification model "
                   "(recipe resnet50, demo resnet9_w16; see --list-archs)")
    g.add_argument("--list-archs", action="store_true", help="print the valid --arch names and exit")
    g.add_argument("--epochs", type=int, default=None, help="epochs (recipe 180, demo 8)")
    g.add_argument("--max-steps", type=int, default=0,
                   help="stop (with a checkpoint) after this many optimizer steps in total; 0 = no limit; "
                   "the LR schedule still spans --epochs")
    g.add_argument("--batch-size", "-b", type=int, default=None, help="source images per rank and step "
                   "(each gives 3 views with JSD; recipe 128, demo 32)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (recipe 0.01, demo 0.02)")
    g.add_argument("--lr-scale-batch", type=int, default=0, metavar="N",
                   help="linear scaling: use lr * global_batch / N (e.g. 256); 0 = no scaling (official)")
    g.add_argument("--warmup-epochs", type=float, default=None, help="linear warmup before the cosine")
    g.add_argument("--lr-schedule", choices=("cosine", "piecewise"), default=None,
                   help="cosine per iteration (official IPMix), or piecewise: lr/10 from 50 %% and "
                   "lr/100 from 75 %% of training (Rice et al.; cifar-adv)")
    g.add_argument("--nesterov", choices=("on", "off"), default=None,
                   help="Nesterov momentum (official IPMix on; cifar-adv off)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--wd", "--weight-decay", dest="wd", type=float, default=5e-4)
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision (auto: bf16 on GPU, off on CPU)")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across ranks")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("run")
    g.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="training and DALI device (auto: gpu if CUDA works)")
    g.add_argument("--output-dir", default=None,
                   help="checkpoints, metrics.jsonl, TensorBoard (default runs/<arch>-<time>)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output dir that holds checkpoints (deletes them)")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint; 'auto' = latest in --output-dir")
    g.add_argument("--ckpt-every", type=int, default=None, metavar="N",
                   help="also checkpoint every N steps (0 = only at epoch ends)")
    g.add_argument("--keep-ckpts", type=int, default=3, help="checkpoints kept (oldest deleted)")
    g.add_argument("--print-freq", type=int, default=None, help="progress line every N steps")
    g.add_argument("--no-tensorboard", action="store_true")
    advmixup.add_adv_args(p)
    return p


# ---------------------------------------------------------------------------------------------
# Small helpers

def is_main(args) -> bool:
    return args.rank == 0


def log(args, *msg):
    if is_main(args):
        print(*msg, flush=True)


def list_archs():
    return models.list_models()


def fmt_time(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0, seconds))))


def find_checkpoints(folder):
    """[(step, path)] sorted by step."""
    out = []
    for path in glob.glob(os.path.join(str(folder), "checkpoint_*.pth")):
        m = CKPT_PATTERN.match(os.path.basename(path))
        if m:
            out.append((int(m.group(1)), path))
    return sorted(out)


class _KeepWriteError:
    """A file whose failed write is remembered: torch.save swallows the OSError of a full disk and
    raises ``RuntimeError: unexpected pos`` instead, which must not pass for a bug."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def atomic_torch_save(obj, path):
    """Write to a temp file in the same folder, fsync, then rename over ``path``; a failed write
    raises OSError (disk full, quota, permissions) and leaves no temp file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _KeepWriteError(f)
            try:
                torch.save(obj, sink)
            except RuntimeError:
                if sink.error is None:
                    raise
                raise sink.error from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def dali_gpu_count() -> int:
    try:
        from nvidia.dali.backend import GetCUDADeviceCount
        return int(GetCUDADeviceCount())
    except Exception:
        return 0


# ---------------------------------------------------------------------------------------------
# Setup: everything that can fail because of the user's input runs here, before any work.

def init_distributed(args):
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.rank = int(os.environ.get("RANK", "0"))
    args.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    args.distributed = args.world_size > 1


def resolve_device(args):
    want = args.device
    cuda_ok = torch.cuda.is_available() and dali_gpu_count() > 0
    if want == "gpu" and not cuda_ok:
        raise UserError("--device gpu: no CUDA GPU usable by both PyTorch and DALI here; use --device cpu")
    use_gpu = cuda_ok if want == "auto" else want == "gpu"
    if use_gpu:
        torch.cuda.set_device(args.local_rank % torch.cuda.device_count())
        args.torch_device = torch.device("cuda", torch.cuda.current_device())
        args.dali_device, args.dali_device_id = "gpu", torch.cuda.current_device()
    else:
        args.torch_device = torch.device("cpu")
        args.dali_device, args.dali_device_id = "cpu", None
    if args.amp == "auto":
        args.amp = "bf16" if use_gpu else "off"
    if args.amp == "fp16" and not use_gpu:
        raise UserError("--amp fp16 needs a GPU; use --amp bf16 or --amp off on CPU")


def apply_defaults(args):
    args.demo = args.data_path is None and args.train_dir is None
    if args.demo and (args.val_dir or args.mixing_set):
        raise UserError("--val-dir/--mixing-set need --data-path or --train-dir as well")
    if not args.demo and not args.mixing_set:
        raise UserError("--mixing-set is required with --data-path/--train-dir (a folder of "
                        "fractal pictures; make one with `dali-ipmix fractals --out DIR --count 1000`)")
    defaults = DEMO_DEFAULTS if args.demo else RECIPE_DEFAULTS
    if args.preset == "cifar-adv":
        # recorded as "cifar": checkpoints name the IPMix preset (dali-ipmix eval reads it)
        args.preset, args.recipe = "cifar", "cifar-adv"
        defaults = {**defaults, **CIFAR_ADV_DEFAULTS}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag in ("epochs", "batch_size", "workers"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    check_numbers(args)
    advmixup.check_adv_args(args)
    if not 0 < args.crop_scale <= 1:
        raise UserError(f"--crop-scale must be in (0, 1], got {args.crop_scale}")


# (flag dest, test, what the test asks): numbers argparse cannot bound; NaN fails every test, so a
# NaN flag is refused here rather than showing up as a NaN loss many steps later.
NUMBER_RULES = (
    ("lr", lambda v: 0 < v < math.inf, "a finite number > 0"),
    ("momentum", lambda v: 0 < v < 1, "in (0, 1) (Nesterov SGD needs a momentum)"),
    ("wd", lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("jsd_weight", lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    ("warmup_epochs", lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    ("beta", lambda v: v is None or 0 < v < math.inf, "a finite number > 0"),
    ("aug_severity", lambda v: v is None or math.isfinite(v), "a finite number"),
    ("print_freq", lambda v: v >= 1, ">= 1"),
    ("max_steps", lambda v: v >= 0, ">= 0 (0 = no limit)"),
    ("ckpt_every", lambda v: v >= 0, ">= 0 (0 = only at epoch ends)"),
    ("keep_ckpts", lambda v: v >= 1, ">= 1"),
    ("lr_scale_batch", lambda v: v >= 0, ">= 0 (0 = no scaling)"),
    ("val_batch_size", lambda v: v is None or v >= 1, ">= 1"),
    ("seed", lambda v: v >= 0, ">= 0"),
    ("mixing_cache_mb", lambda v: v is None or v >= 0, ">= 0 (0 = no cache)"),
)


def check_numbers(args):
    for dest, ok, what in NUMBER_RULES:
        value = getattr(args, dest)
        if not ok(value):
            raise UserError(f"--{dest.replace('_', '-')} must be {what}, got {value}")
    if args.overwrite and args.resume:
        raise UserError("--overwrite starts afresh and --resume continues a run: give one of them")


def resolve_arch(args):
    names = list_archs()
    if args.arch not in names:
        raise UserError(f"unknown --arch {args.arch!r}: not a torchvision classification model nor one "
                        f"of {', '.join(sorted(models.ARCHS))} (`python train.py --list-archs` lists them)")


def resolve_backend(args):
    if args.backend is None:
        args.backend = "fused"
    if args.backend == "fused":
        try:
            import dali_ipmix.fused  # noqa: F401
        except Exception as e:  # being developed / missing optional dependency
            if is_main(args):
                warnings.warn(f"--backend fused is not usable here ({type(e).__name__}: {e}); "
                              f"falling back to --backend dali (slower to build and run)")
            args.backend = "dali"


def build_config(args) -> C.IPMixConfig:
    cfg = C.preset(args.preset)
    changes = {"jsd": not args.no_jsd, "all_ops": args.all_ops or cfg.all_ops}
    for flag, field in (("k", "k"), ("t", "t"), ("beta", "beta"), ("aug_severity", "severity")):
        if getattr(args, flag) is not None:
            changes[field] = getattr(args, flag)
    if args.image_size is not None and args.image_size != cfg.image_size:
        size = args.image_size
        if size < 8:
            raise UserError(f"--image-size must be >= 8, got {size}")
        changes["image_size"] = size
        # the largest official patch is the whole crop: keep that, drop sizes that no longer fit
        changes["patch_sizes"] = tuple(sorted({p for p in cfg.patch_sizes if p < size} | {size}))
    try:
        cfg = cfg.replace(**changes)
    except ValueError as e:
        raise UserError(str(e)) from None
    # adversarial modes: the pipeline emits [0, 1] pixels and the model normalises (epsilon in
    # pixel units); the normalisation constants move from the pipeline into the model
    args.input_mean, args.input_std = cfg.mean, cfg.std
    return advmixup.pixel_config(cfg) if advmixup.uses_pixels(args) else cfg


def resolve_data(args):
    root = Path(args.data_path) if args.data_path else None
    train_dir = Path(args.train_dir) if args.train_dir else root / "train"
    val_dir = Path(args.val_dir) if args.val_dir else (root / "val" if root else None)
    if val_dir is None:
        raise UserError("--train-dir given without --val-dir (or --data-path with a val/ folder)")
    if not val_dir.is_dir():
        raise UserError(f"validation folder {val_dir} does not exist (expected class folders "
                        f"val/<class>/*.jpg; give --val-dir)")
    args.train_flag = "--train-dir" if args.train_dir else "--data-path train"
    args.train_dir, args.val_dir = str(train_dir), str(val_dir)
    check_data(args)


def check_data(args):
    """Count files and compare the batch with a shard; raises UserError."""
    from dali_ipmix import readers
    files, _, classes = readers.listed_or_found(args.train_dir, args.train_filelist,
                                                flag=getattr(args, "train_flag", "--data-path train"))
    vfiles, _, vclasses = readers.listed_or_found(args.val_dir, args.val_filelist, flag="--val-dir")
    readers.picture_files(args.mixing_set, flag="--mixing-set", filelist=args.mixing_filelist)
    if vclasses != classes:
        raise UserError(f"validation classes of {args.val_dir} ({len(vclasses)}) differ from the training "
                        f"classes of {args.train_dir} ({len(classes)}); the folder names must match")
    shard = len(files) // args.world_size
    if args.batch_size > shard:
        raise UserError(f"--batch-size {args.batch_size} is larger than a shard: {len(files)} training "
                        f"images / {args.world_size} rank(s) = {shard} per rank; lower --batch-size")
    args.num_classes = len(classes)
    args.num_train, args.num_val = len(files), len(vfiles)


def prepare_output_dir(args):
    if args.output_dir is None:
        if args.resume not in (None, "auto"):
            args.output_dir = os.path.dirname(os.path.abspath(args.resume))
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            args.output_dir = os.path.join("runs", f"{'demo-' if args.demo else ''}{args.arch}-{stamp}")
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise UserError(f"--output-dir {out} is not writable ({e.strerror or e})") from None
    args.output_lock = lock_output_dir(out)
    existing = find_checkpoints(out)
    args.previous_run = previous_run_files(out) if args.resume is None else []
    if args.previous_run and not args.overwrite:
        what = (f"{len(existing)} checkpoint(s)" if existing else
                ", ".join(os.path.basename(p) for p in args.previous_run))
        raise UserError(f"--output-dir {out} already holds {what} of another run; pass --resume auto "
                        f"to continue it, --overwrite to start afresh (deletes that run's files), "
                        f"or another --output-dir")
    if args.resume == "auto":
        if not existing:
            raise UserError(f"--resume auto: no checkpoint_*.pth in {out}")
        args.resume = existing[-1][1]


LOCK_FILE = ".train.lock"


def lock_output_dir(out):
    """Hold an exclusive lock on ``out`` while this run lives, so a second run into the same folder
    is refused instead of interleaving checkpoints and metrics.  flock: the kernel drops the lock
    when the process ends, however it ends, so a crashed run leaves no stale lock.  Returns the
    open lock file to keep (None where the file system has no locks)."""
    import fcntl
    import socket
    f = open(os.path.join(str(out), LOCK_FILE), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read(200).strip() or "pid unknown"
        f.close()
        raise UserError(f"--output-dir {out} is in use by another train.py run ({holder}); wait for "
                        f"it to end (or stop it), or choose another --output-dir") from None
    except OSError as e:
        f.close()
        print(f"train.py: warning: cannot lock --output-dir {out} ({e.strerror or e}); a second run "
              f"into it would not be refused", file=sys.stderr, flush=True)
        return None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def unlock_output_dir(args):
    lock = getattr(args, "output_lock", None)
    if lock is not None:
        lock.close()
        args.output_lock = None


def previous_run_files(out):
    """What an earlier run wrote into ``out`` (checkpoints, their temp files, metrics, summary,
    TensorBoard events, the best robust checkpoint): the files ``--overwrite`` deletes and whose
    presence needs a decision."""
    names = [p for _, p in find_checkpoints(out)]
    names += glob.glob(os.path.join(str(out), ".tmp-checkpoint_*"))
    names += [os.path.join(str(out), n) for n in (METRICS_FILE, SUMMARY_FILE, TENSORBOARD_DIR,
                                                  BEST_ROBUST)
              if os.path.lexists(os.path.join(str(out), n))]
    return names


def delete_previous_run(args):
    """--overwrite: remove the earlier run's files, after every check passed and the lock is held,
    so that pruning, ``--resume auto`` and metrics.jsonl only ever see this run."""
    import shutil
    for path in args.previous_run:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    if args.previous_run:
        log(args, f"--overwrite: deleted the previous run's files in {args.output_dir}: "
                  f"{', '.join(sorted(os.path.basename(p) for p in args.previous_run))}")


def load_resume_checkpoint(args):
    if args.resume is None:
        return None
    if not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: no such file")
    try:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"--resume {args.resume}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise UserError(f"--resume {args.resume}: not a train.py checkpoint (no model/arch entries)")
    if ckpt["arch"] != args.arch:
        raise UserError(f"--resume {args.resume}: checkpoint of --arch {ckpt['arch']}, but this run "
                        f"uses --arch {args.arch}; pass --arch {ckpt['arch']}")
    recorded = ckpt.get("args", {})
    if recorded.get("num_classes", args.num_classes) != args.num_classes:
        raise UserError(f"--resume {args.resume}: checkpoint of a {recorded['num_classes']}-class model, "
                        f"but {args.train_dir} has {args.num_classes} classes; resume with the data it "
                        f"was trained on, or start a new run")
    if recorded.get("batch_size", args.batch_size) != args.batch_size:
        raise UserError(f"--resume {args.resume}: checkpoint trained with --batch-size "
                        f"{recorded['batch_size']}, this run has {args.batch_size}; pass --batch-size "
                        f"{recorded['batch_size']} (the schedule's length and the data position depend on it)")
    return ckpt


# ---------------------------------------------------------------------------------------------
# Model, optimiser, schedule

def create_model(args, model_factory=None) -> nn.Module:
    if model_factory is not None:
        return model_factory(args.num_classes)
    return models.get_model(args.arch, args.num_classes)


def make_lr_lambda(total_steps: int, warmup_steps: int, min_factor: float, schedule: str = "cosine"):
    """Official schedule: cosine per iteration from 1 to ``min_factor`` (multiplier of the peak lr),
    after an optional linear warmup.  ``piecewise``: Rice et al.'s 1, 1/10 from half of training,
    1/100 from three quarters, read at the end of each step as their lr_schedule(epoch + (i+1)/n)."""
    def lr_lambda(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "piecewise":
            done = (step + 1) / max(1, total_steps)
            return 1.0 if done < 0.5 else 0.1 if done < 0.75 else 0.01
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr_lambda


# ---------------------------------------------------------------------------------------------
# Data

def build_loaders(args, cfg, dali_checkpoint=None):
    from dali_ipmix.loader import DaliLoader
    from pipelines import cifar, imagenet
    # float16 views under mixed precision on GPU halve the loader's output traffic (as NVIDIA's
    # DALI ResNet-50 examples do); the adversarial modes perturb the pixels: they keep float32
    dtype = "float16" if args.dali_device == "gpu" and args.amp != "off" \
        and not advmixup.uses_pixels(args) else "float"
    common = dict(cfg=cfg, batch_size=args.batch_size, num_threads=args.workers, dtype=dtype,
                  device=args.dali_device, device_id=args.dali_device_id, backend=args.backend,
                  seed=args.seed, shard_id=args.rank, num_shards=args.world_size,
                  enable_checkpointing=True, checkpoint=dali_checkpoint,
                  filelist=args.train_filelist, mixing_filelist=args.mixing_filelist,
                  mixing_cache_mb="auto" if args.mixing_cache_mb is None else args.mixing_cache_mb)
    if args.preset == "cifar":
        # 32 px pictures: flip + RandomCrop(32, padding=4); validation is the picture itself
        resize = cfg.image_size
        train_pipe = cifar.train_pipeline(args.train_dir, args.mixing_set, **common)
    else:
        resize = max(cfg.image_size, round(cfg.image_size * 256 / 224))  # Resize(256) of a 224 crop
        train_pipe = imagenet.train_pipeline(args.train_dir, args.mixing_set, resize=resize,
                                              random_area=(args.crop_scale, 1.0), **common)
    val_pipe = imagenet.val_pipeline(
        args.val_dir, cfg=cfg, batch_size=args.val_batch_size or args.batch_size, num_threads=args.workers,
        device=args.dali_device, device_id=args.dali_device_id, shard_id=args.rank,
        num_shards=args.world_size, resize=resize, filelist=args.val_filelist, dtype=dtype)
    train = DaliLoader(train_pipe, last_batch=args.last_batch, device=args.torch_device,
                       channels_last=args.channels_last)
    val = DaliLoader(val_pipe, last_batch="partial", device=args.torch_device,
                     channels_last=args.channels_last)
    return train, val


# ---------------------------------------------------------------------------------------------
# Metrics

def write_failed(args, what, error):
    """Remember a failed write for the summary (the run itself goes on)."""
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    args.failed_writes = getattr(args, "failed_writes", []) + [f"{what} ({reason})"]


class MetricsWriter:
    """metrics.jsonl (+ TensorBoard scalars when available); rank 0 only.

    Records are appended as whole lines with os.write; when a write fails (disk full) the unwritten
    bytes stay queued (up to MAX_QUEUED) and go out with the next record, so the file keeps whole
    lines in order and loses nothing once space returns."""

    MAX_QUEUED = 16 << 20

    def __init__(self, args):
        self.enabled = is_main(args)
        self.args, self.fd, self.tb = args, None, None
        self.queued, self.failing, self.failures, self.dropped = b"", None, 0, 0
        if not self.enabled:
            return
        self.path = os.path.join(args.output_dir, METRICS_FILE)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if not args.no_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(args.output_dir, TENSORBOARD_DIR))
            except Exception as e:  # tensorboard is an optional dependency
                print(f"note: TensorBoard logging skipped ({type(e).__name__}: {e}); metrics go to "
                      f"{METRICS_FILE} only", flush=True)

    def write(self, record: dict, step: int):
        if not self.enabled:
            return
        line = (json.dumps(record) + "\n").encode()
        if len(self.queued) + len(line) <= self.MAX_QUEUED:
            self.queued += line
        else:
            self.dropped += 1
        self._flush()
        if self.tb is not None:
            prefix = record.get("kind", "train")
            try:
                for key, value in record.items():
                    if key not in ("kind", "step", "epoch") and isinstance(value, (int, float)):
                        self.tb.add_scalar(f"{prefix}/{key}", value, step)
            except Exception as e:  # its writer thread hits the full disk first, raises here later
                print(f"train.py: warning: TensorBoard logging stopped ({type(e).__name__}: {e}); "
                      f"{METRICS_FILE} goes on", file=sys.stderr, flush=True)
                write_failed(self.args, TENSORBOARD_DIR, e)
                self.tb = None

    def _flush(self):
        while self.queued:
            try:
                self.queued = self.queued[os.write(self.fd, self.queued):]
            except OSError as e:
                self.failures += 1
                if self.failing is None:
                    print(f"train.py: warning: writing {self.path} failed ({e.strerror or e}); its "
                          f"records wait in memory and are written with the next one that fits",
                          file=sys.stderr, flush=True)
                self.failing = e
                return
        if self.failing is not None:
            print(f"train.py: {self.path} is written again; "
                  + (f"{self.dropped} record(s) did not fit in memory" if self.dropped else "no record lost"),
                  flush=True)
            self.failing = None

    def close(self):
        if self.fd is not None:
            self._flush()
            os.close(self.fd)
            self.fd = None
            if self.failures or self.dropped:
                lost = self.queued.count(b"\n") + self.dropped
                write_failed(self.args, METRICS_FILE, f"{self.failures} failed write(s), "
                             + (f"{lost} record(s) lost" if lost else "every record written later"))
        if self.tb is not None:
            try:
                self.tb.close()
            except Exception as e:
                write_failed(self.args, TENSORBOARD_DIR, e)


def all_reduce_sum(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def topk_correct(logits, labels, ks):
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(labels.view(-1, 1))
    return [hit[:, :min(k, maxk)].any(dim=1).sum().item() for k in ks]


def evaluate(model, loader, args):
    model.eval()
    loss_sum, c1, c5, n = 0.0, 0.0, 0.0, 0
    crit = nn.CrossEntropyLoss(reduction="sum")
    with torch.inference_mode(), autocast(args):
        for images, labels in loader:
            if labels.numel() == 0:
                continue
            logits = model(images).float()
            loss_sum += crit(logits, labels).item()
            a1, a5 = topk_correct(logits, labels, (1, 5))
            c1, c5, n = c1 + a1, c5 + a5, n + labels.numel()
    loss_sum, c1, c5, n = all_reduce_sum([loss_sum, c1, c5, n], args.torch_device)
    n = max(n, 1)
    return {"val_loss": loss_sum / n, "val_top1": 100.0 * c1 / n, "val_top5": 100.0 * c5 / n,
            "val_images": int(n)}


def autocast(args):
    if args.amp in ("bf16", "fp16"):
        return torch.autocast(args.torch_device.type,
                              dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)
    return torch.autocast(args.torch_device.type, enabled=False)


# ---------------------------------------------------------------------------------------------
# Checkpoints

def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_dali_states(loader, args):
    state = loader.checkpoint()
    if args.distributed:
        states = [None] * args.world_size
        dist.all_gather_object(states, state)
        return states
    return [state]


def save_checkpoint(args, *, model, optimizer, scheduler, scaler, epoch, step, epoch_done,
                    train_loader, best_top1, history, epoch_steps=0):
    dali_states = gather_dali_states(train_loader, args)  # a collective: every rank calls it
    if not is_main(args):
        return None
    ckpt = {
        "model": args.net.state_dict(),
        "input": {"pixels_0_1": advmixup.uses_pixels(args), "mean": list(args.input_mean),
                  "std": list(args.input_std)},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,                  # epoch to continue (in progress unless epoch_done)
        "epoch_done": epoch_done,
        "epoch_steps": epoch_steps,      # steps of that epoch done (all: its validation is due)
        "step": step,
        "arch": args.arch,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "world_size": args.world_size,
        "dali_state": dali_states,       # one per rank
        "rng": rng_state(),
        "best_top1": best_top1,
        "history": history,
    }
    path = os.path.join(args.output_dir, f"checkpoint_{step:08d}.pth")
    try:
        atomic_torch_save(ckpt, path)
    except OSError as e:
        # disk full, permissions, quota: the run goes on, older checkpoints stay as they are
        kept = find_checkpoints(args.output_dir)
        print(f"train.py: warning: writing checkpoint {path} failed ({e.strerror or e}); "
              f"{'previous checkpoint ' + kept[-1][1] if kept else 'no earlier checkpoint'} kept; "
              f"the next checkpoint tries again", file=sys.stderr, flush=True)
        write_failed(args, os.path.basename(path), e)
        return None
    for _, old in find_checkpoints(args.output_dir)[:-max(1, args.keep_ckpts)]:
        try:
            os.unlink(old)
        except OSError:
            pass
    return path


# ---------------------------------------------------------------------------------------------
# Interruption

class StopRequest:
    """SIGTERM / SIGINT ask the loop to stop after the current step (a second Ctrl-C stops at once).

    With several ranks a signal may reach them at different steps, and checkpointing is collective,
    so the flags are OR-reduced over a gloo group: the reduction started after step s is read after
    step s + 1 (no stall waiting for it), and every rank stops after the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, distributed: bool):
        self.signum = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        self._group = dist.new_group(backend="gloo") if distributed else None
        self._pending = None

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def should_stop(self) -> bool:
        if self._group is None:
            return self.signum is not None
        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            stop = bool(flag.item())
        flag = torch.tensor([0 if self.signum is None else int(self.signum)], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group,
                                         async_op=True), flag)
        if stop and self.signum is None:
            self.signum = int(flag.item()) or signal.SIGTERM
        return stop

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "signal"

    def close(self):
        if self._pending is not None:
            self._pending[0].wait()
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------
# Main

def main(argv=None, *, model_factory=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.list_archs:
        print("\n".join(list_archs()))
        return 0
    try:
        return run(args, model_factory=model_factory)
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 2


def run(args, model_factory=None) -> int:
    t_start = time.perf_counter()
    init_distributed(args)
    apply_defaults(args)
    if model_factory is None:
        resolve_arch(args)
    resolve_device(args)
    if args.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if args.torch_device.type == "cuda" else "gloo")
    try:
        return _run(args, model_factory, t_start)
    except RuntimeError as e:
        # a bad file met by DALI mid-run: one line naming it and how to skip it, not a traceback
        from dali_ipmix.verify import SEARCH_LIMIT, explain_pipeline_error
        data = [d for d in (getattr(args, "train_dir", None), getattr(args, "val_dir", None)) if d]
        mixing = [args.mixing_set] if getattr(args, "mixing_set", None) else []
        err = explain_pipeline_error(e, data, mixing, search_limit=SEARCH_LIMIT)
        if err is None:
            raise
        raise err from None
    finally:
        unlock_output_dir(args)
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _sync_user_error(args, error):
    """Make every rank fail together when one rank found a user error (no hanging collectives)."""
    if not args.distributed:
        if error:
            raise error
        return
    msgs = [None] * args.world_size
    dist.all_gather_object(msgs, str(error) if error else None)
    for m in msgs:
        if m:
            raise UserError(m)


def _run(args, model_factory, t_start) -> int:
    resolve_backend(args)
    cfg = build_config(args)
    error = None
    try:
        if args.demo:
            if is_main(args):
                from dali_ipmix.demo_data import ensure_demo_data
                train_dir, val_dir, mixing = ensure_demo_data(args.demo_cache, log=lambda m: log(args, m))
                paths = [str(train_dir), str(val_dir), str(mixing)]
            else:
                paths = [None, None, None]
            if args.distributed:
                dist.broadcast_object_list(paths, src=0)
            args.train_dir, args.val_dir, args.mixing_set = paths
            check_data(args)
        else:
            resolve_data(args)
        if is_main(args):
            prepare_output_dir(args)
        ckpt = load_resume_checkpoint(args) if is_main(args) else None
    except UserError as e:
        error = e
    _sync_user_error(args, error)
    if is_main(args):
        delete_previous_run(args)
    if args.distributed:
        obj = [args.output_dir, args.resume]
        dist.broadcast_object_list(obj, src=0)
        args.output_dir, args.resume = obj
        ckpt = load_resume_checkpoint(args) if not is_main(args) else ckpt

    # ---- model and optimiser --------------------------------------------------------------------
    torch.manual_seed(args.seed)
    net = create_model(args, model_factory).to(args.torch_device)
    if args.distributed and args.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    # checkpoints hold ``net`` alone; in the adversarial modes the model takes [0, 1] pixels and
    # starts with the normalisation layer
    model = (advmixup.with_normalization(net, args.input_mean, args.input_std).to(args.torch_device)
             if advmixup.uses_pixels(args) else net)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    args.net, args.model_without_ddp = net, model
    global_batch = args.batch_size * args.world_size
    lr = args.lr * global_batch / args.lr_scale_batch if args.lr_scale_batch else args.lr
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum,
                                nesterov=args.nesterov == "on", weight_decay=args.wd)
    scaler = torch.amp.GradScaler(args.torch_device.type, enabled=args.amp == "fp16")

    dali_state = None
    if ckpt is not None:
        if ckpt.get("world_size") == args.world_size and ckpt.get("dali_state"):
            dali_state = ckpt["dali_state"][args.rank]
        else:
            log(args, f"warning: checkpoint written by {ckpt.get('world_size')} rank(s), this run has "
                      f"{args.world_size}: the data pipeline restarts its epoch (data order differs)")
    train_loader, val_loader = build_loaders(args, cfg, dali_state)
    steps_per_epoch = len(train_loader)  # same on every rank (drop: floor of the smallest shard)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(round(args.warmup_epochs * steps_per_epoch))
    final_lr = 1e-6 * 128 / global_batch          # official: 1e-6 / (lr * bs / 128) as a multiplier
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, make_lr_lambda(total_steps, warmup_steps, min(1.0, final_lr / lr), args.lr_schedule))

    start_epoch, step, best_top1, history, resumed_steps = 0, 0, 0.0, [], 0
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        best_top1, history = ckpt.get("best_top1", 0.0), ckpt.get("history", [])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and args.torch_device.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        if not ckpt.get("epoch_done", True):
            resumed_steps = ckpt.get("epoch_steps", step - start_epoch * steps_per_epoch)
            if dali_state is None and resumed_steps < steps_per_epoch:
                start_epoch += 1  # cannot replay the rest of that epoch's data; start the next one
                resumed_steps = 0
        log(args, f"resumed from {args.resume}: epoch {start_epoch + 1}, step {step}"
                  + (" (its training is done; its validation runs now)"
                     if resumed_steps >= steps_per_epoch else ""))

    if args.distributed:
        device_ids = [args.torch_device.index] if args.torch_device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if args.compile:
        model = torch.compile(model)

    metrics = MetricsWriter(args)
    log(args, f"train.py: {'DEMO ' if args.demo else ''}arch {args.arch}, {args.num_classes} classes, "
              f"{args.num_train} train / {args.num_val} val images, image {cfg.image_size}px, "
              f"{cfg.views} view(s){' + JSD' if cfg.jsd else ''}, backend {args.backend}, "
              f"device {args.torch_device} (DALI {args.dali_device}), amp {args.amp}, "
              f"{args.world_size} rank(s) x batch {args.batch_size}, lr {lr:g}, "
              f"{args.epochs} epochs x {steps_per_epoch} steps"
              + (f", stopping after step {args.max_steps} (--max-steps)" if 0 < args.max_steps < total_steps
                 else "") + f" -> {args.output_dir}")
    if args.demo:
        log(args, "note: this is the built-in demo (synthetic data, small model); the real recipe is "
                  "--data-path IMAGENET --mixing-set FRACTALS with the defaults (ResNet-50, 224 px)")

    # ---- training ---------------------------------------------------------------------------------
    setup_time = time.perf_counter() - t_start
    train_images, train_time, last_path, stopped = 0, 0.0, None, False
    views = cfg.views
    ckpt_kw = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                   train_loader=train_loader)
    stop_request = StopRequest(args.distributed)
    interrupted = False
    try:
        for epoch in range(start_epoch, args.epochs):
            model.train()
            win = {"t": time.perf_counter(), "data": 0.0, "n": 0, "losses": [], "c1": 0.0, "seen": 0}
            t_data = time.perf_counter()
            in_epoch = resumed_steps if epoch == start_epoch else 0
            # a run stopped on an epoch's last step resumes with that epoch's validation; the
            # restored reader then starts the next epoch
            for images, labels in (train_loader if in_epoch < steps_per_epoch else ()):
                now = time.perf_counter()
                win["data"] += now - t_data
                if args.adv_mixup != "off":
                    # the attack runs on the unwrapped model (no DDP all-reduce of attack gradients)
                    loss, info = advmixup.adv_mixup_loss(
                        args.model_without_ddp, model, images, labels, args.num_classes, args,
                        seed=args.seed, epoch=epoch, step=step, rank=args.rank,
                        autocast_ctx=lambda: autocast(args), views=views)
                    correct = info["correct"]
                else:
                    with autocast(args):
                        logits = model(images)
                    loss, clean = ipmix_loss(logits, labels, views, jsd_weight=args.jsd_weight,
                                             label_smoothing=args.label_smoothing)
                    correct = (clean.detach().argmax(1) == labels).sum()
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                in_epoch += 1
                win["n"] += 1
                win["seen"] += labels.numel()
                win["losses"].append((step, loss.detach()))
                win["c1"] += correct

                if step % args.print_freq == 0 or step == args.max_steps:
                    report_window(args, metrics, win, epoch, step, total_steps, scheduler)
                    train_images += win["seen_global"]
                    train_time += win["elapsed"]
                    win = {"t": time.perf_counter(), "data": 0.0, "n": 0, "losses": [], "c1": 0.0, "seen": 0}
                if args.ckpt_every and step % args.ckpt_every == 0:
                    last_path = save_checkpoint(args, epoch=epoch, step=step, epoch_done=False,
                                                epoch_steps=in_epoch, best_top1=best_top1,
                                                history=history, **ckpt_kw) or last_path
                if args.max_steps and step >= args.max_steps and in_epoch < steps_per_epoch:
                    stopped = True   # on an epoch's last step the epoch ends first (validation)
                    break
                if stop_request.should_stop():
                    stopped = interrupted = True
                    break
                t_data = time.perf_counter()
            if win["n"]:
                report_window(args, metrics, win, epoch, step, total_steps, scheduler)
                train_images += win["seen_global"]
                train_time += win["elapsed"]
            if stopped:
                if not (args.ckpt_every and step % args.ckpt_every == 0):
                    last_path = save_checkpoint(args, epoch=epoch, step=step, epoch_done=False,
                                                epoch_steps=in_epoch, best_top1=best_top1,
                                                history=history, **ckpt_kw) or last_path
                why = f"by {stop_request.name()}" if interrupted else "(--max-steps)"
                log(args, f"stopped {why} after step {step}"
                          + (f" (the last of epoch {epoch + 1}; its validation runs when resumed)"
                             if in_epoch >= steps_per_epoch else "")
                          + f"; checkpoint {last_path or 'not written'}; "
                          f"continue with: --resume auto --output-dir {args.output_dir}")
                break
            t0 = time.perf_counter()
            res = evaluate(args.model_without_ddp, val_loader, args)  # unwrapped: no DDP collectives
            best_top1 = max(best_top1, res["val_top1"])
            rec = {"kind": "epoch", "epoch": epoch + 1, "step": step, **res, "best_top1": best_top1,
                   "val_seconds": time.perf_counter() - t0}
            log(args, f"epoch {epoch + 1}/{args.epochs}: val top-1 {res['val_top1']:.2f}%  top-5 "
                      f"{res['val_top5']:.2f}%  loss {res['val_loss']:.4f}  ({res['val_images']} images, "
                      f"{rec['val_seconds']:.1f} s)  best top-1 {best_top1:.2f}%")
            if args.adv_eval_every and ((epoch + 1) % args.adv_eval_every == 0 or epoch + 1 == args.epochs):
                rec.update(robust_check(args, val_loader, epoch + 1, step, history))
            history.append(rec)
            metrics.write(rec, step)
            last_path = save_checkpoint(args, epoch=epoch + 1, step=step, epoch_done=True,
                                        best_top1=best_top1, history=history, **ckpt_kw) or last_path
            if args.max_steps and step >= args.max_steps and epoch + 1 < args.epochs:
                log(args, f"stopped (--max-steps) after step {step}, the last of epoch {epoch + 1}; "
                          f"checkpoint {last_path or 'not written'}; continue with: --resume auto "
                          f"--output-dir {args.output_dir}")
                break
        if args.adv_eval != "off" and not interrupted:
            robust = robust_evaluate(args, val_loader, steps=args.adv_eval_steps,
                                     restarts=args.adv_eval_restarts, images=args.adv_eval_images,
                                     autoattack=args.adv_eval == "autoattack")
            metrics.write({"kind": "robust", "step": step, **{k: v for k, v in robust.items()
                                                            if isinstance(v, (int, float))}}, step)
            history.append({"kind": "robust", **robust})
    finally:
        stop_request.close()
        metrics.close()
    if interrupted:
        return 128 + int(stop_request.signum)   # the shell's convention for "killed by signal"
    demo_files = {}
    if args.demo and is_main(args):   # a sheet of one augmented batch, loss/accuracy curves
        from dali_ipmix import demo_outputs
        demo_files = demo_outputs.write_for_run(args, cfg, log=lambda m: log(args, m))

    total = time.perf_counter() - t_start
    if is_main(args):
        img_s = train_images / train_time if train_time else 0.0
        epochs_done = [h for h in history if h.get("kind") == "epoch"]
        last = epochs_done[-1] if epochs_done else None
        lines = [
            "=" * 72,
            f"summary: {args.arch}{' (demo)' if args.demo else ''}, {step} steps, "
            f"{args.world_size} rank(s) x batch {args.batch_size} ({views} view(s) each)",
            f"  val top-1: last {last['val_top1']:.2f}%  best {best_top1:.2f}%  (chance "
            f"{100.0 / args.num_classes:.1f}%)  top-5 last {last['val_top5']:.2f}%" if last else
            "  val top-1: (no completed epoch)",
            f"  throughput: {img_s:.1f} source img/s ({img_s * views:.1f} views/s) while training",
            f"  time: {fmt_time(total)} total ({total:.1f} s; setup {setup_time:.1f} s, training {train_time:.1f} s)",
            *([f"  best robust (PGD-{advmixup.SELECT_STEPS}, {args.adv_eval_eps * 255:g}/255, "
               f"{best['robust_images']} val images): {best['robust_pgd']:.2f}% (clean {best['robust_clean']:.2f}%) "
               f"after epoch {best['epoch']} -> {os.path.join(args.output_dir, BEST_ROBUST)}"
               for best in [best_robust(history)] if best]),
            *([f"  robust ({r['eps'] * 255:g}/255): clean {r['clean']:.2f}%  PGD-{r['steps']} {r['pgd']:.2f}%"
               + (f"  AutoAttack {r['autoattack']:.2f}%" if r.get('autoattack') is not None else "")
               + f"  ({r['images']} images)"
               for r in history if r.get("kind") == "robust"]),
            f"  checkpoint: {last_path}" if last_path else "  checkpoint: none",
            f"  metrics: {os.path.join(args.output_dir, METRICS_FILE)}",
            *(demo_outputs.summary_lines(args, demo_files) if args.demo else []),
        ]
        summary = {"arch": args.arch, "steps": step, "best_top1": best_top1,
                   "last": last, "img_per_s": img_s, "seconds": total,
                   "robust": [h for h in history if h.get("kind") == "robust"],
                   "best_robust": best_robust(history)}
        try:
            write_atomic(os.path.join(args.output_dir, SUMMARY_FILE),
                         json.dumps(dict(summary, failed_writes=getattr(args, "failed_writes", []))))
        except OSError as e:
            write_failed(args, SUMMARY_FILE, e)
        failed = getattr(args, "failed_writes", [])
        lines += [f"  failed write: {w}" + (f" x{failed.count(w)}" if failed.count(w) > 1 else "")
                  for w in dict.fromkeys(failed)]
        print("\n".join(lines + ["=" * 72]), flush=True)
    return 0


def best_robust(history):
    """The epoch record with the highest PGD accuracy of the per-epoch check (the first if tied)."""
    checked = [h for h in history if h.get("robust_pgd") is not None]
    return max(checked, key=lambda h: h["robust_pgd"]) if checked else None


def robust_check(args, loader, epoch, step, history) -> dict:
    """The per-epoch PGD check (--adv-eval-every); writes best_robust.pth when it improves."""
    t0 = time.perf_counter()
    res = robust_evaluate(args, loader, steps=advmixup.SELECT_STEPS, images=args.adv_val_images,
                          what=f"epoch {epoch}/{args.epochs}: PGD-{advmixup.SELECT_STEPS} check")
    best = best_robust(history)
    out = {"robust_clean": res["clean"], "robust_pgd": res["pgd"], "robust_images": res["images"],
           "robust_seconds": time.perf_counter() - t0}
    if best is None or res["pgd"] > best["robust_pgd"]:
        out["best_robust_pgd"] = res["pgd"]
        if is_main(args):
            path = os.path.join(args.output_dir, BEST_ROBUST)
            try:   # what `dali-ipmix eval` loads: weights, arch, args, input kind
                atomic_torch_save({"model": args.net.state_dict(), "arch": args.arch, "epoch": epoch,
                                   "step": step, "robust": out,
                                   "args": {k: v for k, v in vars(args).items()
                                            if isinstance(v, (int, float, str, bool, type(None)))},
                                   "input": {"pixels_0_1": True, "mean": list(args.input_mean),
                                             "std": list(args.input_std)}}, path)
            except OSError as e:
                print(f"train.py: warning: writing {path} failed ({e.strerror or e})", file=sys.stderr,
                      flush=True)
            else:
                log(args, f"  most robust so far -> {path}")
    else:
        out["best_robust_pgd"] = best["robust_pgd"]
    return out


def robust_evaluate(args, loader, *, steps, restarts=1, autoattack=False, images=0,
                    what="robust eval") -> dict:
    """Clean / PGD (/ AutoAttack) accuracy on ``images`` validation images (0 = all) spread evenly
    over the list, in float32: input gradients under bf16/fp16 autocast can underflow and weaken
    the attack.  Each rank takes its share of its shard; counts are summed over ranks."""
    r, w, n = args.rank, args.world_size, args.num_val
    shard = n * (r + 1) // w - n * r // w           # the validation reader's shard of this rank
    keep = images * (r + 1) // w - images * r // w if images else 0
    res = advmixup.robust_eval(
        args.model_without_ddp, advmixup.spread_batches(loader, shard, keep), args.adv_eval_eps,
        args.adv_eval_step_size, steps, restarts=restarts, autoattack=autoattack,
        seed=args.seed + args.rank)
    keys = [k for k in res if k.startswith("n_")] + ["images"]
    sums = dict(zip(keys, all_reduce_sum([res[k] for k in keys], args.torch_device)))
    total = max(sums["images"], 1)
    for k in keys[:-1]:
        res[k[2:]] = 100.0 * sums[k] / total
    res["images"] = int(sums["images"])
    res["clean_minus_pgd"] = res["clean"] - res["pgd"]
    if res.get("autoattack") is not None:
        res["pgd_minus_aa"] = res["pgd"] - res["autoattack"]
    log(args, f"{what} ({res['images']} images, eps {res['eps'] * 255:.3g}/255, float32): clean "
              f"{res['clean']:.2f}%  PGD-{steps} {res['pgd']:.2f}%" + (f"  AutoAttack {res['autoattack']:.2f}%"
                                          if res.get("autoattack") is not None else ""))
    return res


def report_window(args, metrics, win, epoch, step, total_steps, scheduler):
    """Reduce a window of steps over ranks, print one progress line, write step records."""
    elapsed = time.perf_counter() - win["t"]
    losses = torch.stack([l for _, l in win["losses"]]).float().cpu()  # one sync per window
    c1 = float(win["c1"]) if torch.is_tensor(win["c1"]) else win["c1"]
    loss_sum, c1, seen, data_t, el = all_reduce_sum(
        [float(losses.sum()), c1, win["seen"], win["data"], elapsed], args.torch_device)
    n_ranks = args.world_size
    win["seen_global"], win["elapsed"] = seen, el / n_ranks
    img_s = seen / max(el / n_ranks, 1e-9)
    data_share = data_t / max(el, 1e-9)
    step_time = (el / n_ranks) / max(win["n"], 1)
    end = min(args.max_steps, total_steps) if args.max_steps else total_steps
    eta = step_time * max(0, end - step)
    lr = scheduler.get_last_lr()[0]
    mean_loss = loss_sum / (win["n"] * n_ranks)
    if not math.isfinite(mean_loss):
        raise UserError(f"the training loss became {mean_loss} by step {step} (diverged); the last good "
                        f"checkpoint is kept: lower --lr (now {lr:g}) or add --warmup-epochs, then "
                        f"--resume or start afresh")
    if is_main(args):
        for s, l in zip([s for s, _ in win["losses"]], losses.tolist()):
            metrics.write({"kind": "step", "epoch": epoch + 1, "step": s, "loss": l}, s)
        metrics.write({"kind": "train", "epoch": epoch + 1, "step": step, "loss": mean_loss,
                       "top1_clean": 100.0 * c1 / max(seen, 1), "lr": lr, "img_per_s": img_s,
                       "data_wait": data_share}, step)
        print(f"epoch {epoch + 1}/{args.epochs} step {step}/{end}  loss {mean_loss:.4f}  "
              f"train top-1 {100.0 * c1 / max(seen, 1):.1f}%  lr {lr:.4g}  {img_s:.1f} img/s  "
              f"data wait {100 * data_share:.0f}%  ETA {fmt_time(eta)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
