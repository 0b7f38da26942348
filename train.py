#!/usr/bin/env python
"""Train an image classifier with IPMix augmentation fed by NVIDIA DALI.

In the style of torchvision's references/classification/train.py: one file, explicit flags, the
stages in the order they run (``main`` -> ``run``: the parsed flags resolved into one frozen
record, ``RunConfig``, by ``resolve_flags``, ``resolve_device``, ``resolve_backend`` and
``prepare_run``, each returning a new record -> ``train``: ``build_training`` with ``load_data``,
then ``fit``: per epoch ``train_one_epoch`` and ``end_epoch`` with ``evaluate``; at the end
``training.metrics.print_summary``); the plumbing -- the record, checkpoints, metrics, ranks, the
lr schedule -- lives in ``dali_ipmix/training/`` (README "Training", docs/architecture.md).

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
validation top-1 in 1.5 to 4 minutes on 2 CPU cores (README, BENCHMARKS.md), and leaves a sheet of one
augmented batch and a plot of the curves in the output folder
(``dali_ipmix/training/demo_outputs.py``).  It shows the whole path (generation -> DALI IPMix ->
training -> validation -> checkpoints), not the ImageNet recipe.

``--batch-size`` is per process (rank); the global batch is batch-size x world size.
Each rank runs its own DALI pipeline on its own shard (shard_id=rank) with its own seed.
Checkpoints hold the model, optimizer, scheduler, grad scaler, RNG states and the DALI pipeline
state of every rank, so ``--resume PATH`` (or ``--resume auto``) continues with the exact next
batch.  Errors in the user's input are reported as one line (exit code 2) before any work starts.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from dali_ipmix import advmixup
from dali_ipmix import config as C
from dali_ipmix import models, s3
from dali_ipmix.errors import UserError
from dali_ipmix.helpformat import HelpFormatter
from dali_ipmix.losses import ipmix_loss
from dali_ipmix.readers import MAX_PIXELS
from dali_ipmix.training import (checkpoint, demo_outputs, distributed, metrics, precision, robust,
                                 schedule)
from dali_ipmix.training.recipes import (CIFAR_ADV_DEFAULTS, DEMO_DEFAULTS, RECIPE_DEFAULTS,
                                         JSD_WEIGHT, check_numbers, recipe_and_demo,
                                         resolve_jsd_weight)
from dali_ipmix.training.run_config import RunConfig
from dali_ipmix.training.state import Model, RunState


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser(description="IPMix + DALI classification training "
                                "(no data flags: built-in demo)", add_help=add_help,
                                formatter_class=HelpFormatter)
    add_data_args(p.add_argument_group("data"))
    add_ipmix_args(p.add_argument_group("IPMix"))
    add_optimisation_args(p.add_argument_group("model and optimisation"))
    add_run_args(p.add_argument_group("run"))
    advmixup.add_adv_args(p)
    return p


def add_data_args(g):
    g.add_argument("--data-path", default=None, help="folder with train/ and val/ class folders "
                   "or shard sets (`dali-ipmix shard`), or s3://bucket/prefix of them (omit for the "
                   "built-in demo; docs/scaling.md)")
    g.add_argument("--train-dir", default=None, help="training class folder (default DATA_PATH/train)")
    g.add_argument("--val-dir", default=None, help="validation class folder (default DATA_PATH/val)")
    g.add_argument("--mixing-set", default=None, help="folder of mixing pictures (fractals; or a "
                   "shard set, s3://); make one with `dali-ipmix fractals --out DIR --count N`")
    g.add_argument("--train-filelist", default=None, metavar="FILE", help="train only on the files "
                   "listed (`dali-ipmix verify TRAIN_DIR --write-filelist FILE` leaves out bad ones)")
    g.add_argument("--val-filelist", default=None, metavar="FILE", help="the same for validation")
    g.add_argument("--mixing-filelist", default=None, metavar="FILE",
                   help="the same for the mixing set (`dali-ipmix verify DIR --mixing --write-filelist FILE`)")
    g.add_argument("--mixing-cache-mb", type=int, default=None, metavar="MB",
                   help="GPU memory for the decoded mixing pictures, so each is decoded once "
                   "(default: enough for the whole set, at most 4096; 0: decode every time)")
    g.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help="a picture DALI stops on whose header claims more pixels is named as too "
                   "large (a decompression bomb; `dali-ipmix verify --max-pixels N` finds them "
                   "all beforehand)")
    g.add_argument("--demo-cache", default=None, help="cache folder of the demo data "
                   "(default $DALI_IPMIX_CACHE or ~/.cache/dali_ipmix/demo)")
    g.add_argument("--workers", "-j", type=int, default=4, help="DALI CPU threads per rank")
    g.add_argument("--last-batch", choices=("drop", "partial", "fill"), default="drop",
                   help="what to do with the last incomplete training batch of an epoch "
                   "(validation always uses 'partial', so padding is never counted)")
    g.add_argument("--crop-scale", type=float, default=None, metavar="MIN",
                   help=f"smallest RandomResizedCrop area fraction ({recipe_and_demo('crop_scale')}; the "
                   "recipe's is torchvision's; the demo's pictures hold one object, which small crops cut off)")
    g.add_argument("--val-batch-size", type=int, default=None, help="validation batch (default: --batch-size)")


def add_ipmix_args(g):
    g.add_argument("--preset", choices=sorted(C.PRESETS) + ["cifar-adv"], default="imagenet",
                   help="IPMix hyperparameters; cifar-adv = cifar with --adv-mixup aom and Rice et al.'s "
                   "adversarial-training schedule (docs/adversarial.md)")
    g.add_argument("--image-size", type=int, default=None,
                   help=f"crop size (recipe {C.IMAGENET.image_size}, demo {DEMO_DEFAULTS['image_size']}); patch "
                   "sizes above it are dropped and it is added")
    g.add_argument("--backend", choices=("fused", "dali", "none"), default=None,
                   help="IPMix implementation inside the DALI graph (default fused; 'dali' if the fused "
                   "kernel cannot be imported); 'none' = no augmentation")
    g.add_argument("--no-jsd", action="store_true", help="one IPMix view and plain cross-entropy "
                   "(default: clean + 2 IPMix views with the JSD consistency loss; with --adv-mixup "
                   "one view unless --adv-jsd)")
    g.add_argument("--jsd-weight", type=float, default=None, help=f"weight of the JSD term (default "
                   f"{JSD_WEIGHT:g}, the official weight)")
    g.add_argument("--k", type=int, default=None, help="IPMix chains (preset: 3)")
    g.add_argument("--t", type=int, default=None, help="max chain depth (preset: 3)")
    g.add_argument("--beta", type=float, default=None, help="add/multiply mixing strength (preset)")
    g.add_argument("--aug-severity", type=float, default=None, help="image-op severity (preset)")
    g.add_argument("--all-ops", action="store_true", help="also use the ImageNet-C-overlapping ops")


def add_optimisation_args(g):
    g.add_argument("--arch", "-a", default=None, help="any torchvision classification model "
                   f"({recipe_and_demo('arch')}; see --list-archs)")
    g.add_argument("--list-archs", action="store_true", help="print the valid --arch names and exit")
    g.add_argument("--epochs", type=int, default=None, help=f"epochs ({recipe_and_demo('epochs')})")
    g.add_argument("--max-steps", type=int, default=0,
                   help="stop (with a checkpoint) after this many optimizer steps in total; 0 = no limit; "
                   "the LR schedule still spans --epochs")
    g.add_argument("--batch-size", "-b", type=int, default=None, help="source images per rank and step "
                   f"(each gives 3 views with JSD; {recipe_and_demo('batch_size')})")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate ({recipe_and_demo('lr')})")
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
    g.add_argument("--amp", choices=precision.AMP_MODES, default="auto",
                   help="mixed precision (auto: bf16 on GPU, off on CPU)")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across ranks")
    g.add_argument("--seed", type=int, default=0)


def add_run_args(g):
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


# ---------------------------------------------------------------------------------------------
# Flags: defaults of the recipe, the demo or the preset, and checks that need no file

def wants_demo(flags: RunConfig) -> bool:
    return flags.data_path is None and flags.train_dir is None


def resolve_flags(args: argparse.Namespace) -> RunConfig:
    """The run's record of the parsed flags (``args`` is only read), with the recipe's, the
    demo's or the preset's defaults filled in and the checks that need no file passed."""
    flags = RunConfig.parsed(args)
    demo = wants_demo(flags)
    if demo and (flags.val_dir or flags.mixing_set):
        raise UserError("--val-dir/--mixing-set need --data-path or --train-dir as well")
    if not demo and not flags.mixing_set:
        raise UserError("--mixing-set is required with --data-path/--train-dir (a folder of "
                        "fractal pictures; make one with `dali-ipmix fractals --out DIR --count 1000`)")
    defaults = DEMO_DEFAULTS if demo else RECIPE_DEFAULTS
    if flags.preset == "cifar-adv":
        # recorded as "cifar": checkpoints name the IPMix preset (dali-ipmix eval reads it)
        flags = flags.replace(preset="cifar", recipe="cifar-adv")
        defaults = {**defaults, **CIFAR_ADV_DEFAULTS}
    flags = flags.replace(**{key: value for key, value in defaults.items() if getattr(flags, key) is None})
    for flag in ("epochs", "batch_size", "workers"):
        if getattr(flags, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(flags, flag)}")
    check_numbers(flags)
    flags = flags.replace(**advmixup.resolve_adv_flags(vars(flags)))
    flags = flags.replace(jsd_weight=resolve_jsd_weight(flags))
    if not 0 < flags.crop_scale <= 1:
        raise UserError(f"--crop-scale must be in (0, 1], got {flags.crop_scale}")
    return flags


def resolve_arch(flags: RunConfig):
    if flags.arch not in models.list_models():
        raise UserError(f"unknown --arch {flags.arch!r}: not a torchvision classification model nor one "
                        f"of {', '.join(sorted(models.ARCHS))} (`python train.py --list-archs` lists them)")


def resolve_backend(flags: RunConfig, state) -> RunConfig:
    """``flags`` with the IPMix backend this machine runs (fused unless asked or unusable)."""
    backend = flags.backend or "fused"
    if backend == "fused":
        try:
            import dali_ipmix.fused  # noqa: F401
        except Exception as e:  # being developed / missing optional dependency
            if state.is_main:
                warnings.warn(f"--backend fused is not usable here ({type(e).__name__}: {e}); "
                              f"falling back to --backend dali (slower to build and run)")
            backend = "dali"
    return flags.replace(backend=backend)


def build_config(flags: RunConfig) -> C.IPMixConfig:
    """The IPMix configuration of the flags; in the adversarial modes the pipeline gets
    ``advmixup.pixel_config`` of it and the model normalises with its mean and std."""
    cfg = C.preset(flags.preset)
    changes = {"jsd": not flags.no_jsd, "all_ops": flags.all_ops or cfg.all_ops}
    for flag, field in (("k", "k"), ("t", "t"), ("beta", "beta"), ("aug_severity", "severity")):
        if getattr(flags, flag) is not None:
            changes[field] = getattr(flags, flag)
    if flags.image_size is not None and flags.image_size != cfg.image_size:
        size = flags.image_size
        changes["image_size"] = size
        # the largest official patch is the whole crop: keep that, drop sizes that no longer fit
        changes["patch_sizes"] = tuple(sorted({p for p in cfg.patch_sizes if p < size} | {size}))
    try:
        return cfg.replace(**changes)
    except ValueError as e:
        raise UserError(str(e)) from None


def resolve_device(flags: RunConfig, state) -> RunConfig:
    """The devices (into ``state``); returns ``flags`` with the mixed precision they take."""
    state.torch_device, state.dali_device, state.dali_device_id = distributed.pick_device(
        flags.device, state.local_rank)
    return flags.replace(amp=precision.resolve_amp(flags.amp, gpu=state.torch_device.type == "cuda"))


# ---------------------------------------------------------------------------------------------
# Set-up: the data, the output folder and the checkpoint to resume, checked before any work

def prepare_run(flags: RunConfig, state):
    """Find and check the data, prepare the output folder, load the ``--resume`` checkpoint: a
    user error on any rank stops every rank here.  Returns ``flags`` complete (the data sources,
    the output folder, the checkpoint to resume) and that checkpoint (or None)."""
    error, ckpt = None, None
    try:
        flags = find_demo_data(flags, state) if state.demo else resolve_data(flags, state)
        if flags.adv_eval == "autoattack":    # not after the training: torchattacks, >= 4 classes
            advmixup.check_autoattack(state.num_classes)
        if state.is_main:
            output_dir, resume = checkpoint.prepare_output_dir(flags, state)
            flags = flags.replace(output_dir=output_dir, resume=resume)
            ckpt = checkpoint.load_resume_checkpoint(flags, state.num_classes)
    except UserError as e:
        error = e
    distributed.raise_together(error, state.world_size)
    if state.is_main:
        checkpoint.delete_previous_run(state.previous_run, flags.output_dir, state.log)
    if state.distributed:
        output_dir, resume = distributed.broadcast([flags.output_dir, flags.resume], state.world_size)
        flags = flags.replace(output_dir=output_dir, resume=resume)
        error = None
        if not state.is_main:   # e.g. the file is not on this node's file system
            try:
                ckpt = checkpoint.load_resume_checkpoint(flags, state.num_classes)
            except UserError as e:
                error = e
        distributed.raise_together(error, state.world_size)
    checkpoint.check_not_complete(flags, ckpt)   # every rank holds ckpt: they all stop here
    if state.is_main:
        checkpoint.sign_lock(state.output_lock)
    return flags, ckpt


def find_demo_data(flags: RunConfig, state) -> RunConfig:
    """Generated once into the cache by rank 0; every rank reads the same folders."""
    paths, error = [None, None, None], None
    if state.is_main:
        from dali_ipmix.data.demo import ensure_demo_data
        try:
            paths = [str(p) for p in ensure_demo_data(flags.demo_cache, log=state.log)]
        except (UserError, OSError) as e:   # sent with the paths: the other ranks wait in this broadcast
            error = str(e) if isinstance(e, UserError) else f"demo data: {e}"
    *paths, error = distributed.broadcast([*paths, error], state.world_size)
    if error:
        raise UserError(error)
    train_dir, val_dir, mixing_set = paths
    return check_data(flags.replace(train_dir=train_dir, val_dir=val_dir, mixing_set=mixing_set), state)


def resolve_data(flags: RunConfig, state) -> RunConfig:
    root = flags.data_path.rstrip("/") if flags.data_path else None
    train_dir = flags.train_dir or f"{root}/train"
    val_dir = flags.val_dir or (f"{root}/val" if root else None)
    if val_dir is None:
        raise UserError("--train-dir given without --val-dir (or --data-path with a val/ folder)")
    train_flag = "--train-dir" if flags.train_dir else "--data-path train"
    return check_data(flags.replace(train_dir=str(train_dir), val_dir=str(val_dir)), state, train_flag)


def check_data(flags: RunConfig, state, train_flag="--data-path train") -> RunConfig:
    """List the data once per run: rank 0 opens the data sources (class folders, shard sets,
    s3://) and sends the records to the other ranks, so a bucket or a parallel file system is
    listed once, not once per rank; returns ``flags`` whose ``train_dir`` / ``val_dir`` /
    ``mixing_set`` are the records, which the pipelines are built from.  Counts them (into
    ``state.num_classes``, ``num_train``, ``num_val``); raises UserError on every rank."""
    found, error = [None, None, None], None
    if state.is_main:
        try:
            found = list(open_data(flags, state, train_flag))
        except UserError as e:        # sent with the records: the other ranks wait in this broadcast
            error = str(e)
    *found, error = distributed.broadcast([*found, error], state.world_size)
    if error:
        raise UserError(error)
    train, val, mixing = found
    state.num_classes, state.num_train, state.num_val = len(train.classes), train.size, val.size
    on_s3 = [src.location for src in (train, mixing) if src.on_s3]
    if on_s3:   # DALI's readers fetch one object or shard member per request, one at a time
        state.log(f"note: {' and '.join(on_s3)}: DALI reads S3 data with one request per file or "
                  f"shard member (two per shard sample: picture and label), one after another on "
                  f"each rank, so a rank reads at most about 1 / (2 x request latency) samples/s; "
                  f"to feed a GPU, copy the data to local or shared disk first (docs/scaling.md, "
                  f"\"From S3\")")
    return flags.replace(train_dir=train, val_dir=val, mixing_set=mixing)


def open_data(flags: RunConfig, state, train_flag):
    """(train, val, mixing) data sources, checked against each other and the batch size."""
    from dali_ipmix import sources
    if not s3.is_s3(flags.val_dir) and not Path(flags.val_dir).is_dir():
        raise UserError(f"validation folder {flags.val_dir} does not exist (expected class folders "
                        f"val/<class>/*.jpg or a shard set; give --val-dir)")
    train = sources.open_source(flags.train_dir, flag=train_flag, filelist=flags.train_filelist)
    val = sources.open_source(flags.val_dir, flag="--val-dir", filelist=flags.val_filelist)
    mixing = sources.open_source(flags.mixing_set, flag="--mixing-set", filelist=flags.mixing_filelist,
                                 labelled=False)
    if val.classes != train.classes:
        raise UserError(f"validation classes of {flags.val_dir} ({len(val.classes)}) differ from the "
                        f"training classes of {flags.train_dir} ({len(train.classes)}); the folder "
                        f"names must match")
    shard = train.size // state.world_size
    if flags.batch_size > shard:
        raise UserError(f"--batch-size {flags.batch_size} is larger than a shard: {train.size} training "
                        f"images / {state.world_size} rank(s) = {shard} per rank; lower --batch-size")
    return train, val, mixing


def load_data(flags: RunConfig, state, cfg):
    """This rank's training and validation loaders: the preset's IPMix graph on its shard, built
    by the public loaders (``dali_ipmix.ipmix_loader``) as a user's own loop builds them."""
    from dali_ipmix.ipmix_loader import IPMixLoader, IPMixValLoader
    pixels = flags.uses_pixels
    # float16 views under mixed precision on GPU halve the loader's output traffic (as NVIDIA's
    # DALI ResNet-50 examples do); the adversarial modes perturb the pixels: they keep float32
    dtype = "float16" if state.dali_device == "gpu" and flags.amp != "off" and not pixels else "float32"
    cfg = advmixup.pixel_config(cfg) if pixels else cfg
    where = dict(preset=flags.preset, cfg=cfg, device=state.torch_device, rank=state.rank,
                 world_size=state.world_size, num_threads=flags.workers, dtype=dtype,
                 channels_last=flags.channels_last)
    train = IPMixLoader(
        flags.train_dir, flags.mixing_set, batch_size=flags.batch_size, seed=flags.seed,
        last_batch=flags.last_batch, backend=flags.backend, filelist=flags.train_filelist,
        # the CIFAR graph crops with RandomCrop(32, padding=4): --crop-scale is RandomResizedCrop's
        crop_scale=None if flags.preset == "cifar" else flags.crop_scale,
        mixing_filelist=flags.mixing_filelist,
        mixing_cache_mb="auto" if flags.mixing_cache_mb is None else flags.mixing_cache_mb, **where)
    val = IPMixValLoader(flags.val_dir, batch_size=flags.val_batch_size or flags.batch_size,
                         filelist=flags.val_filelist, **where)
    return train, val


# ---------------------------------------------------------------------------------------------
# Model, optimiser, schedule, resume

@dataclass(frozen=True)
class Training:
    """What the loop steps, built by ``build_training``."""
    model: Model                    # the network, what evaluation calls, what a step calls
    adv: Optional[advmixup.AdvConfig]   # the adversarial mode's switches; None: --adv-mixup off
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    train_loader: object
    val_loader: object
    steps_per_epoch: int            # same on every rank (drop: floor of the smallest shard)
    lr: float                       # the peak, after --lr-scale-batch
    views: int                      # views per source image (3 with the JSD triple)


def create_model(flags: RunConfig, state, cfg, model_factory=None) -> Model:
    """The run's ``Model``: the bare network (what checkpoints hold); the model evaluation calls --
    in the adversarial modes it takes [0, 1] pixels and starts with the normalisation layer --;
    that model in DDP / torch.compile, which the training step calls; and what it takes,
    recorded for `dali-ipmix eval`."""
    torch.manual_seed(flags.seed)
    net = (model_factory(state.num_classes) if model_factory is not None
           else models.get_model(flags.arch, state.num_classes)).to(state.torch_device)
    if state.distributed and flags.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    pixels = flags.uses_pixels
    module = advmixup.with_normalization(net, cfg.mean, cfg.std).to(state.torch_device) if pixels else net
    if flags.channels_last:
        module = module.to(memory_format=torch.channels_last)
    step = module
    if state.distributed:   # a checkpoint is loaded into ``net`` after this (as torchvision's reference)
        device_ids = [state.torch_device.index] if state.torch_device.type == "cuda" else None
        step = nn.parallel.DistributedDataParallel(step, device_ids=device_ids)
    if flags.compile:
        step = torch.compile(step)
    return Model(net=net, module=module, step=step,
                 input={"pixels_0_1": pixels, "mean": list(cfg.mean), "std": list(cfg.std)})


def build_training(flags: RunConfig, state, cfg, ckpt, model_factory=None):
    """Model, optimiser, loaders (at the checkpoint's data position) and schedule, resumed from
    ``ckpt``.  Returns the Training and where to start: (epoch, steps of it already done)."""
    model = create_model(flags, state, cfg, model_factory)
    global_batch = flags.batch_size * state.world_size
    lr = schedule.peak_lr(flags.lr, global_batch, flags.lr_scale_batch)
    optimizer = torch.optim.SGD(model.module.parameters(), lr=lr, momentum=flags.momentum,
                                nesterov=flags.nesterov == "on", weight_decay=flags.wd)
    scaler = torch.amp.GradScaler(state.torch_device.type, enabled=flags.amp == "fp16")
    train_loader, val_loader = load_data(flags, state, cfg)
    replayable = ckpt is not None and resume_loader(flags, state, train_loader, ckpt)
    steps_per_epoch = len(train_loader)
    scheduler = schedule.lr_scheduler(
        optimizer, peak=lr, global_batch=global_batch, epochs=flags.epochs,
        steps_per_epoch=steps_per_epoch, warmup_epochs=flags.warmup_epochs, schedule=flags.lr_schedule)
    adv = advmixup.AdvConfig.from_args(flags) if flags.adv_mixup != "off" else None
    training = Training(model=model, adv=adv, optimizer=optimizer, scheduler=scheduler,
                        scaler=scaler, train_loader=train_loader, val_loader=val_loader,
                        steps_per_epoch=steps_per_epoch, lr=lr, views=cfg.views)
    start = restore(flags, state, training, ckpt, replayable=replayable) if ckpt else (0, 0)
    if ckpt is not None and state.distributed:
        check_same_checkpoint(flags, state, model.net, ckpt)
    return training, start


def check_same_checkpoint(flags: RunConfig, state, net: nn.Module, ckpt) -> None:
    """Every rank must have loaded the same checkpoint: DDP copies rank 0's weights when it is
    built, which is before the load (torchvision's order), so nothing else would catch a rank
    that read another file at the same path (a node-local --output-dir holding an older run)."""
    with torch.no_grad():
        weights = float(sum(p.detach().double().sum().item() for p in net.parameters()))
    seen = distributed.all_gather((ckpt["step"], weights), state.world_size)
    if any(step != seen[0][0] or abs(w - seen[0][1]) > 1e-9 * max(1.0, abs(seen[0][1]))
           for step, w in seen):
        raise UserError(f"--resume {flags.resume}: the ranks loaded different checkpoints (step by "
                        f"rank: {[step for step, _ in seen]}; weights differ); give every rank the "
                        f"same file: an --output-dir on storage all nodes share")


def resume_loader(flags: RunConfig, state, train_loader, ckpt) -> bool:
    """Put the training loader where ``ckpt`` left it; False where it cannot (another world size:
    the data restarts its epoch, with a warning)."""
    loader_state = ckpt.get("loader_state")
    why = ("it holds no loader state (an older checkpoint)" if not loader_state else
           f"it was written by {loader_state.get('world_size')} rank(s), this run has {state.world_size}"
           if loader_state.get("world_size") != state.world_size else None)
    if why:
        state.log(f"warning: {why}: the data pipeline restarts its epoch (data order differs)")
        return False
    try:
        train_loader.load_state_dict(loader_state)
    except ValueError as e:
        raise UserError(f"--resume {flags.resume}: {e}") from None
    return True


def restore(flags: RunConfig, state, training, ckpt, replayable: bool):
    """Load every state of ``ckpt``; returns (epoch, steps of it done) to continue from."""
    training.model.net.load_state_dict(ckpt["model"])
    training.optimizer.load_state_dict(ckpt["optimizer"])
    training.scheduler.load_state_dict(ckpt["scheduler"])
    training.scaler.load_state_dict(ckpt["scaler"])
    epoch, state.step = ckpt["epoch"], ckpt["step"]
    state.best_top1, state.history = ckpt.get("best_top1", 0.0), ckpt.get("history", [])
    checkpoint.restore_rng(ckpt["rng"], state.torch_device)
    done = 0
    if not ckpt.get("epoch_done", True):
        done = ckpt.get("epoch_steps", state.step - epoch * training.steps_per_epoch)
        if not replayable and done < training.steps_per_epoch:
            epoch, done = epoch + 1, 0  # cannot replay the rest of that epoch's data; start the next one
    state.log(f"resumed from {flags.resume}: epoch {epoch + 1}, step {state.step}"
              + (" (its training is done; its validation runs now)"
                 if done >= training.steps_per_epoch else ""))
    return epoch, done


def save_checkpoint(flags: RunConfig, state, training, *, epoch, epoch_done, epoch_steps=0):
    """Every rank calls it (the DALI states are gathered); rank 0 writes."""
    loader_state = training.train_loader.state_dict()   # a collective: every rank's position
    if not state.is_main:
        return
    ckpt = {
        "model": training.model.net.state_dict(),
        "input": training.model.input,
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "scaler": training.scaler.state_dict(),
        "epoch": epoch,                  # epoch to continue (in progress unless epoch_done)
        "epoch_done": epoch_done,
        "epoch_steps": epoch_steps,      # steps of that epoch done (all: its validation is due)
        "step": state.step,
        "arch": flags.arch,
        "args": state.recorded_args(flags),
        "world_size": state.world_size,
        "loader_state": loader_state,    # IPMixLoader.state_dict(): the DALI state of every rank
        "rng": checkpoint.rng_state(),
        "best_top1": state.best_top1,
        "history": state.history,
    }
    path = checkpoint.write_checkpoint(ckpt, flags.output_dir, state.step, flags.keep_ckpts,
                                       state.failed_writes)
    state.last_checkpoint = path or state.last_checkpoint
    state.checkpoint_failed = path is None


# ---------------------------------------------------------------------------------------------
# Training and evaluation

def training_loss(flags: RunConfig, state, training, images, labels, epoch):
    """The step's loss and its count of correct clean predictions."""
    if training.adv is not None:
        # the attack runs on the unwrapped model (no DDP all-reduce of attack gradients)
        loss, info = advmixup.adv_mixup_loss(
            training.model.module, training.model.step, images, labels, state.num_classes, training.adv,
            seed=flags.seed, epoch=epoch, step=state.step, rank=state.rank, views=training.views,
            autocast_ctx=lambda: precision.autocast(flags.amp, state.torch_device.type))
        return loss, info["correct"]
    with precision.autocast(flags.amp, state.torch_device.type):
        logits = training.model.step(images)
    loss, clean = ipmix_loss(logits, labels, training.views, jsd_weight=flags.jsd_weight,
                             label_smoothing=flags.label_smoothing)
    return loss, (clean.detach().argmax(1) == labels).sum()


def train_one_epoch(flags: RunConfig, state, training, epoch, done, progress, stop):
    """Train ``epoch`` from its step ``done`` (a resumed epoch); checkpoints every --ckpt-every
    steps.  Returns None, or why the run stops before the epoch's validation: "max-steps" or
    "signal" (checkpointed and said)."""
    training.model.step.train()
    progress.start_epoch()
    why = None
    # a run stopped on an epoch's last step resumes with that epoch's validation; the restored
    # reader then starts the next epoch
    for images, labels in (training.train_loader if done < training.steps_per_epoch else ()):
        progress.batch_arrived()
        loss, correct = training_loss(flags, state, training, images, labels, epoch)
        training.optimizer.zero_grad(set_to_none=True)
        training.scaler.scale(loss).backward()
        training.scaler.step(training.optimizer)
        training.scaler.update()
        training.scheduler.step()
        state.step += 1
        done += 1
        progress.add(state.step, loss.detach(), correct, labels.numel())
        if state.step % flags.print_freq == 0 or state.step == flags.max_steps:
            progress.report(epoch, state.step, training.scheduler.get_last_lr()[0])
        if flags.ckpt_every and state.step % flags.ckpt_every == 0:
            save_checkpoint(flags, state, training, epoch=epoch, epoch_done=False, epoch_steps=done)
        if flags.max_steps and state.step >= flags.max_steps and done < training.steps_per_epoch:
            why = "max-steps"   # on an epoch's last step the epoch ends first (validation)
            break
        if stop.should_stop():
            why = "signal"
            break
        progress.next_batch()
    progress.report(epoch, state.step, training.scheduler.get_last_lr()[0])
    if why is None:
        return None
    if not (flags.ckpt_every and state.step % flags.ckpt_every == 0):
        save_checkpoint(flags, state, training, epoch=epoch, epoch_done=False, epoch_steps=done)
    log_stopped(flags, state, "by " + stop.name() if why == "signal" else "(--max-steps)",
                f" (the last of epoch {epoch + 1}; its validation runs when resumed)"
                if done >= training.steps_per_epoch else "")
    return why


def log_stopped(flags: RunConfig, state, how, where):
    state.log(f"stopped {how} after step {state.step}{where}; checkpoint "
              f"{state.last_checkpoint or 'not written'}; continue with: --resume auto --output-dir "
              f"{flags.output_dir}")


def evaluate(flags: RunConfig, state, model, loader):
    model.eval()
    loss_sum, c1, c5, n = 0.0, 0.0, 0.0, 0
    crit = nn.CrossEntropyLoss(reduction="sum")
    with torch.inference_mode(), precision.autocast(flags.amp, state.torch_device.type):
        for images, labels in loader:
            if labels.numel() == 0:
                continue
            logits = model(images).float()
            loss_sum += crit(logits, labels).item()
            a1, a5 = metrics.topk_correct(logits, labels, (1, 5))
            c1, c5, n = c1 + a1, c5 + a5, n + labels.numel()
    loss_sum, c1, c5, n = distributed.all_reduce_sum([loss_sum, c1, c5, n], state.torch_device)
    n = max(n, 1)
    return {"val_loss": loss_sum / n, "val_top1": 100.0 * c1 / n, "val_top5": 100.0 * c5 / n,
            "val_images": int(n)}


def end_epoch(flags: RunConfig, state, training, epoch, writer):
    """Validation (and the robust check) of ``epoch``, its record, the epoch's checkpoint."""
    t0 = time.perf_counter()
    distributed.broadcast_buffers(training.model.module, state.world_size)   # evaluate what rank 0 saves
    res = evaluate(flags, state, training.model.module, training.val_loader)  # unwrapped: no DDP collectives
    state.best_top1 = max(state.best_top1, res["val_top1"])
    rec = {"kind": "epoch", "epoch": epoch + 1, "step": state.step, **res,
           "best_top1": state.best_top1, "val_seconds": time.perf_counter() - t0}
    state.log(f"epoch {epoch + 1}/{flags.epochs}: val top-1 {res['val_top1']:.2f}%  top-5 "
              f"{res['val_top5']:.2f}%  loss {res['val_loss']:.4f}  ({res['val_images']} images, "
              f"{rec['val_seconds']:.1f} s)  best top-1 {state.best_top1:.2f}%")
    if flags.adv_eval_every and ((epoch + 1) % flags.adv_eval_every == 0 or epoch + 1 == flags.epochs):
        rec.update(robust.robust_check(flags, state, training.model, training.val_loader, epoch + 1))
    state.history.append(rec)
    writer.write(rec, state.step)
    save_checkpoint(flags, state, training, epoch=epoch + 1, epoch_done=True)


def fit(flags: RunConfig, state, training, start, progress, stop, writer) -> bool:
    """The epochs from ``start`` (epoch, steps of it done), then the final robust evaluation.
    Returns whether a signal stopped the run."""
    start_epoch, resumed_steps = start
    for epoch in range(start_epoch, flags.epochs):
        done = resumed_steps if epoch == start_epoch else 0
        why = train_one_epoch(flags, state, training, epoch, done, progress, stop)
        if why == "signal":
            return True
        if why == "max-steps":
            break
        end_epoch(flags, state, training, epoch, writer)
        if flags.max_steps and state.step >= flags.max_steps and epoch + 1 < flags.epochs:
            log_stopped(flags, state, "(--max-steps)", f", the last of epoch {epoch + 1}")
            break
    if flags.adv_eval != "off":
        distributed.broadcast_buffers(training.model.module, state.world_size)
        res = robust.robust_evaluate(flags, state, training.model, training.val_loader,
                                     steps=flags.adv_eval_steps, restarts=flags.adv_eval_restarts,
                                     images=flags.adv_eval_images, autoattack=flags.adv_eval == "autoattack")
        writer.write({"kind": "robust", "step": state.step,
                      **{k: v for k, v in res.items() if isinstance(v, (int, float))}}, state.step)
        state.history.append({"kind": "robust", **res})
    return False


# ---------------------------------------------------------------------------------------------
# Main

def main(argv=None, *, model_factory=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.list_archs:
        print("\n".join(models.list_models()))
        return 0
    try:
        return run(args, model_factory=model_factory)
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 2


def run(args, model_factory=None) -> int:
    """Resolve the flags into the run's frozen record (``RunConfig``: each step returns a new one;
    ``args`` is only read), find the devices, join the other ranks, prepare the data and the
    output folder, train; whatever happens, unlock the output folder and leave the process group."""
    t_start = time.perf_counter()
    rank, world_size, local_rank = distributed.ranks_from_env()
    flags = resolve_flags(args)
    state = RunState(rank=rank, world_size=world_size, local_rank=local_rank, demo=wants_demo(flags))
    if model_factory is None:
        resolve_arch(flags)
    flags = resolve_device(flags, state)
    if state.distributed:
        distributed.init(state.torch_device)
    try:
        flags = resolve_backend(flags, state)
        cfg = build_config(flags)
        flags, ckpt = prepare_run(flags, state)     # complete: the run reads it, nothing changes it
        return train(flags, state, cfg, ckpt, model_factory, t_start)
    except checkpoint.RunComplete as e:
        state.log(f"train.py: {e}")
        return 0
    except RuntimeError as e:
        # a bad file met by DALI mid-run: one line naming it and how to skip it, not a traceback
        from dali_ipmix.sources import local_folders
        from dali_ipmix.verify import SEARCH_LIMIT, explain_pipeline_error, explain_shard_error
        err = explain_shard_error(e, [flags.train_dir, flags.val_dir, flags.mixing_set], SEARCH_LIMIT)
        if err is None:
            err = explain_pipeline_error(e, local_folders([flags.train_dir, flags.val_dir]),
                                         local_folders([flags.mixing_set]), search_limit=SEARCH_LIMIT,
                                         max_pixels=flags.max_pixels)
        if err is None:
            raise
        raise err from None
    finally:
        state.release()
        if state.distributed:
            distributed.close()


def train(flags: RunConfig, state, cfg, ckpt, model_factory, t_start) -> int:
    training, start = build_training(flags, state, cfg, ckpt, model_factory)
    writer = metrics.MetricsWriter(flags.output_dir, enabled=state.is_main,
                                   tensorboard=not flags.no_tensorboard, failed=state.failed_writes)
    if ckpt is not None:
        # records of steps after this checkpoint may already be in the file (a crash after it):
        # they are written again from here, and the later record of a step is the one that counts
        writer.write({"kind": "resume", "step": state.step, "checkpoint": str(flags.resume)}, state.step)
    total_steps = flags.epochs * training.steps_per_epoch
    end_step = min(flags.max_steps, total_steps) if flags.max_steps else total_steps
    state.log(f"train.py: {'DEMO ' if state.demo else ''}arch {flags.arch}, {state.num_classes} classes, "
              f"{state.num_train} train / {state.num_val} val images, image {cfg.image_size}px, "
              f"{cfg.views} view(s){' + JSD' if cfg.jsd else ''}, backend {flags.backend}, "
              f"device {state.torch_device} (DALI {state.dali_device}), amp {flags.amp}, "
              f"{state.world_size} rank(s) x batch {flags.batch_size}, lr {training.lr:g}, "
              f"{flags.epochs} epochs x {training.steps_per_epoch} steps"
              + (f", stopping after step {flags.max_steps} (--max-steps)" if end_step < total_steps
                 else "") + f" -> {flags.output_dir}")
    if state.demo:
        state.log("note: this is the built-in demo (synthetic data, small model); the real recipe is "
                  "--data-path IMAGENET --mixing-set FRACTALS with the defaults (ResNet-50, 224 px)")
    setup_time = time.perf_counter() - t_start
    progress = metrics.StepWindow(writer, epochs=flags.epochs, end_step=end_step,
                                world_size=state.world_size, device=state.torch_device,
                                is_main=state.is_main)
    stop = distributed.StopRequest(state.distributed)
    try:
        interrupted = fit(flags, state, training, start, progress, stop, writer)
    finally:
        stop.close()
        writer.close()
    if interrupted:
        return 128 + int(stop.signum)   # the shell's convention for "killed by signal"
    if not state.is_main:
        return 0
    demo_lines = []
    if state.demo:   # a sheet of one augmented batch, loss/accuracy curves
        files = demo_outputs.write_for_run(flags, cfg, state.num_classes, log=state.log)
        demo_lines = demo_outputs.summary_lines(flags, files)
    metrics.print_summary(flags, state, training.views, progress, setup_time,
                          time.perf_counter() - t_start, extra_lines=demo_lines)
    if state.checkpoint_failed:   # a run whose training is not on disk is no success
        print(f"train.py: error: the checkpoint of step {state.step} could not be written (see "
              f"the failed writes above); "
              + (f"the newest on disk is {state.last_checkpoint}" if state.last_checkpoint else
                 "no checkpoint of this run is on disk: its training is lost")
              + f"; free space in {flags.output_dir} and run again", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
