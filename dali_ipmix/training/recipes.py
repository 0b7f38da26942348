"""What train.py's flags default to and may be: the defaults that differ between the official IPMix
ImageNet recipe, the built-in demo and ``--preset cifar-adv`` (train.py fills the flags left unset
from them), and the bounds of the numeric flags (README "Training", docs/adversarial.md "The
recipe: --preset cifar-adv")."""
from __future__ import annotations

import math

from ..config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from ..errors import UserError
from .run_config import RunConfig

# the official recipe (hzlsaber/IPMix imagenet.py) with torchvision's RandomResizedCrop scale
RECIPE_DEFAULTS = dict(arch="resnet50", image_size=None, epochs=180, batch_size=128, lr=0.01,
                       warmup_epochs=0, print_freq=50, ckpt_every=1000, crop_scale=0.08,
                       lr_schedule="cosine", nesterov="on")
DEMO_DEFAULTS = dict(arch="resnet9_w16", image_size=32, epochs=8, batch_size=32, lr=0.02,
                     warmup_epochs=1, print_freq=20, ckpt_every=0, crop_scale=0.6,
                     lr_schedule="cosine", nesterov="on")
# --preset cifar-adv: the IPMix cifar preset, --adv-mixup aom, and the CIFAR-10 adversarial-training
# schedule of Rice et al. 2020 (locuslab/robust_overfitting train_cifar.py): PreActResNet-18, batch
# 128, 200 epochs, SGD momentum 0.9 without Nesterov, weight decay 5e-4 (the flags' defaults), lr
# 0.1 divided by 10 at 50 % and by 100 at 75 % of training.
CIFAR_ADV_DEFAULTS = dict(arch="preactresnet18", image_size=32, epochs=200, batch_size=128, lr=0.1,
                          warmup_epochs=0, lr_schedule="piecewise", nesterov="off", adv_mixup="aom")


def recipe_and_demo(key: str) -> str:
    """How a flag's help names its two defaults, e.g. "recipe 180, demo 8"."""
    return f"recipe {RECIPE_DEFAULTS[key]}, demo {DEMO_DEFAULTS[key]}"


MAX_LR = 10.0      # SGD diverges far below this for every model here; above it is a typo
JSD_WEIGHT = 12.0  # the official weight of the JSD term (--jsd-weight's default)

# (flag dest, test, what the test asks): numbers argparse cannot bound; NaN fails every test, so a
# NaN flag is refused here rather than showing up as a NaN loss many steps later.
NUMBER_RULES = (
    ("lr", lambda v: 0 < v <= MAX_LR, f"in (0, {MAX_LR:g}]"),
    ("image_size", lambda v: v is None or MIN_IMAGE_SIZE <= v <= MAX_IMAGE_SIZE,
     f"in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} px"),
    ("momentum", lambda v: 0 < v < 1, "in (0, 1) (Nesterov SGD needs a momentum)"),
    ("wd", lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("jsd_weight", lambda v: v is None or 0 <= v < math.inf, "a finite number >= 0"),
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
    ("max_pixels", lambda v: v >= 1, ">= 1"),
)


def check_numbers(flags: RunConfig):
    for dest, ok, what in NUMBER_RULES:
        value = getattr(flags, dest)
        if not ok(value):
            raise UserError(f"--{dest.replace('_', '-')} must be {what}, got {value}")
    if flags.overwrite and flags.resume:
        raise UserError("--overwrite starts afresh and --resume continues a run: give one of them")
    if flags.output_dir is not None and not flags.output_dir.strip():
        raise UserError("--output-dir is empty; give a folder (left out: runs/<arch>-<time>)")


def resolve_jsd_weight(flags: RunConfig) -> float:
    """After the adversarial flags (which may turn the JSD triple off): the JSD term's weight
    (--jsd-weight, default the official one).  It only weighs the JSD term, so a weight without
    one is refused rather than silently ignored."""
    if flags.jsd_weight is None:
        return JSD_WEIGHT
    if flags.no_jsd:
        raise UserError(f"--jsd-weight {flags.jsd_weight:g} has no effect without the JSD loss (--no-jsd"
                        f"{', or an adversarial mode without --adv-jsd' if flags.adv_mixup != 'off' else ''}); "
                        f"drop it")
    return flags.jsd_weight
