"""``dali-ipmix eval``: the robustness report of a checkpoint (table on stdout, JSON on request)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from ..errors import UserError
from ..helpformat import HelpFormatter
from ..outputs import check_output_file, write_atomic
from ..attacks import PGD_EPS, PGD_STEPS
from .metrics import ECE_BINS, RMS_BIN_SIZE
from .tables import CORRUPTIONS, SEVERITIES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="robustness report of a checkpoint: clean, corruptions, calibration, R/A, PGD",
        description="Evaluate a train.py checkpoint (or a bare state_dict with --arch): clean top-1/top-5 "
                    "error, corruption errors (ImageNet-C or CIFAR-C folder, else the 15 ImageNet-C "
                    "corruptions generated from --data), RMS calibration error and ECE, ImageNet-R/-A "
                    "with 200-class logit masks, PGD-Linf error (by default at 2/255, the IPMix protocol; "
                    "adversarially trained models: --eps 8/255) and, with --autoattack, AutoAttack error.  "
                    "Prints a table; --json writes the full report.  All numbers are percentages.",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("checkpoint_arg", nargs="?", default=None, metavar="CHECKPOINT",
                   help="the same as --checkpoint")
    g.add_argument("--checkpoint", default=None, help="train.py checkpoint_*.pth or best_robust.pth, or "
                   "a state_dict file")
    g.add_argument("--arch", default=None, help="model name (needed for a bare state_dict)")
    g.add_argument("--num-classes", type=int, default=None, help="classes (default: from the checkpoint)")
    g.add_argument("--preset", choices=("imagenet", "cifar"), default=None,
                   help="normalisation and default sizes (default: the checkpoint's, else imagenet)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="VAL_DIR", help="clean validation class folder, or a "
                   "shard set of one (`dali-ipmix shard`), local or s3://BUCKET/PREFIX; its sorted folder "
                   "names (a shard set's manifest classes) are the model's classes")
    g.add_argument("--imagenet-c", default=None, metavar="DIR",
                   help="ImageNet-C copy: DIR/<corruption>/<severity>/<class>/<image> (or a shard set "
                   "per DIR/<corruption>/<severity>); local or s3://BUCKET/PREFIX (listed once)")
    g.add_argument("--cifar-c", default=None, metavar="DIR",
                   help="CIFAR-10-C / CIFAR-100-C copy: DIR/<corruption>.npy, DIR/labels.npy")
    g.add_argument("--no-corruptions", action="store_true", help="skip corruptions (by default they are "
                   "generated from --data when no -C folder is given)")
    g.add_argument("--corruptions", default="all", help="comma-separated subset of: " + ", ".join(CORRUPTIONS))
    g.add_argument("--severities", default="1,2,3,4,5", help="comma-separated severities (1-5)")
    g.add_argument("--imagenet-r", default=None, metavar="DIR", help="ImageNet-R class folders (wnids), or "
                   "their shard set; local or s3://")
    g.add_argument("--imagenet-a", default=None, metavar="DIR", help="ImageNet-A class folders (wnids), or "
                   "their shard set; local or s3://")
    g.add_argument("--image-size", type=int, default=None, help="centre crop (default: the checkpoint's, "
                   "else 224 / 32 for the cifar preset)")
    g.add_argument("--resize", type=int, default=None, help="shorter side before the crop (default "
                   "image-size*256/224; image-size for cifar)")
    g.add_argument("--max-images", type=int, default=None, help="use N images of each set (spread over classes)")
    g = p.add_argument_group("adversarial")
    g.add_argument("--no-pgd", action="store_true", help="skip the PGD evaluation")
    g.add_argument("--eps", "--pgd-eps", dest="pgd_eps", default=None, metavar="E",
                   help=f"L-inf budget in pixels [0,1] of PGD and AutoAttack (default: the eps an "
                   f"adversarially trained checkpoint records, else {PGD_EPS * 255:g}/255, the IPMix "
                   "paper's CIFAR protocol)")
    g.add_argument("--pgd-alpha", default=None, help="PGD step size (default eps/4; the paper: 0.5/255)")
    g.add_argument("--pgd-steps", type=int, default=PGD_STEPS, help="steps (paper: 20)")
    g.add_argument("--pgd-restarts", type=int, default=1, help="random restarts")
    g.add_argument("--pgd-max-images", type=int, default=None, help="attack N clean images (default: all)")
    g.add_argument("--autoattack", action="store_true",
                   help="also AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square with the official "
                   "settings, from torchattacks 3.5.1) at the same eps, on the PGD images")
    g = p.add_argument_group("calibration")
    g.add_argument("--rms-bin-size", type=int, default=RMS_BIN_SIZE, help="samples per adaptive bin")
    g.add_argument("--rms-all-bins", action="store_true",
                   help="count the most confident bin too (the official calib_err leaves it out)")
    g.add_argument("--ece-bins", type=int, default=ECE_BINS, help="equal-width ECE bins")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", "-b", type=int, default=64)
    g.add_argument("--workers", "-j", type=int, default=min(4, os.cpu_count() or 1),
                   help="data-loading processes (0: in the main process)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--seed", type=int, default=0, help="seeds generated corruptions and PGD starts")
    g.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def parse_fraction(text: str, flag: str) -> float:
    """'2/255', '0.0078' -> float."""
    try:
        num, _, den = text.strip().partition("/")
        value = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{flag} {text!r}: give a number or a fraction like 2/255") from None
    return value


def parse_severities(text: str):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--severities {text!r}: give comma-separated integers 1-5") from None
    bad = [v for v in values if v not in SEVERITIES]
    if bad or not values:
        raise UserError(f"--severities {text!r}: severities are 1-5 (got {', '.join(map(str, bad)) or 'none'})")
    return tuple(sorted(set(values)))


def parse_corruptions(text: str):
    if text.strip() == "all":
        return CORRUPTIONS
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in CORRUPTIONS]
    if bad or not names:
        raise UserError(f"--corruptions: unknown {', '.join(bad) or '(empty)'}; "
                        f"choose from {', '.join(CORRUPTIONS)}")
    return tuple(dict.fromkeys(names))


def _positive(value: Optional[int], flag: str, minimum: int = 1):
    if value is not None and value < minimum:
        raise UserError(f"{flag} {value}: must be >= {minimum}")
    return value


def settings_from_args(args, loaded):
    """EvalSettings and (mean, std) from the flags and the checkpoint's recorded args."""
    import torch
    from .. import config as C
    from .evaluate import EvalSettings, PGDSettings
    recorded = loaded.args
    preset_name = args.preset or (recorded.get("preset") if recorded.get("preset") in C.PRESETS else "imagenet")
    cfg = C.preset(preset_name)
    for flag, value in (("--image-size", args.image_size), ("--resize", args.resize)):
        if value is not None and not C.MIN_IMAGE_SIZE <= value <= C.MAX_IMAGE_SIZE:
            raise UserError(f"{flag} {value}: must be in {C.MIN_IMAGE_SIZE}..{C.MAX_IMAGE_SIZE} px")
    size = args.image_size or recorded.get("image_size") or cfg.image_size
    cifar = preset_name == "cifar"
    from pipelines import resize_for
    resize = args.resize or resize_for(size, "cifar" if cifar else "imagenet")
    if resize < size:
        raise UserError(f"--resize {resize} is smaller than the crop --image-size {size}")
    for flag, value in (("--batch-size", args.batch_size), ("--max-images", args.max_images),
                        ("--pgd-max-images", args.pgd_max_images), ("--rms-bin-size", args.rms_bin_size),
                        ("--ece-bins", args.ece_bins), ("--pgd-restarts", args.pgd_restarts)):
        _positive(value, flag)
    _positive(args.workers, "--workers", 0)
    _positive(args.pgd_steps, "--pgd-steps", 0)
    if args.imagenet_c and args.cifar_c:
        raise UserError("give either --imagenet-c or --cifar-c, not both")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; use --device cpu")
    if args.no_pgd and args.autoattack:
        raise UserError("--autoattack runs on the PGD images; drop --no-pgd")
    # an adversarially trained model is attacked at its training radius unless --eps says otherwise
    trained = recorded.get("adv_eps") if recorded.get("adv_mixup") not in (None, "off") else None
    if args.pgd_eps is not None:
        eps_source, eps = "--eps", parse_fraction(args.pgd_eps, "--eps")
    elif trained is not None:
        eps_source, eps = "checkpoint", float(trained)
    else:
        eps_source, eps = "default", PGD_EPS
    alpha = eps / 4 if args.pgd_alpha is None else parse_fraction(args.pgd_alpha, "--pgd-alpha")
    pgd = None if args.no_pgd else PGDSettings(
        eps=eps, alpha=alpha, steps=args.pgd_steps, restarts=args.pgd_restarts,
        max_images=args.pgd_max_images, autoattack=args.autoattack,
        eps_source=eps_source)
    if pgd and not (0 <= pgd.eps <= 1 and 0 <= pgd.alpha <= 1):
        raise UserError(f"--eps / --pgd-alpha are in pixel units [0, 1] (e.g. 8/255), "
                        f"got {args.pgd_eps}, {args.pgd_alpha}")
    settings = EvalSettings(
        data=args.data, image_size=size, resize=resize,
        imagenet_c=None if args.no_corruptions else args.imagenet_c,
        cifar_c=None if args.no_corruptions else args.cifar_c,
        generate_corruptions=not args.no_corruptions,
        corruptions=parse_corruptions(args.corruptions), severities=parse_severities(args.severities),
        imagenet_r=args.imagenet_r, imagenet_a=args.imagenet_a, pgd=pgd, batch_size=args.batch_size,
        workers=args.workers, device=device, seed=args.seed, max_images=args.max_images,
        rms_bin_size=args.rms_bin_size, rms_skip_last_bin=not args.rms_all_bins, ece_bins=args.ece_bins)
    return settings, (cfg.mean, cfg.std), preset_name


def eps_note(pgd, recorded) -> str:
    """The attack radius and where it comes from, with a warning when it is not the radius the
    checkpoint was adversarially trained at (a 2/255 number read as an 8/255 one misleads)."""
    from .evaluate import EPS_SOURCES
    note = (f"PGD{' and AutoAttack' if pgd.autoattack else ''} at eps {pgd.eps * 255:g}/255 "
            f"({EPS_SOURCES[pgd.eps_source]})")
    trained = recorded.get("adv_eps") if recorded.get("adv_mixup") not in (None, "off") else None
    if trained is not None and abs(trained - pgd.eps) > 1e-9:
        note += (f"; this model was adversarially trained at eps {trained * 255:g}/255: "
                 f"pass --eps {trained * 255:g}/255 to evaluate it at that radius")
    return note


def run(args) -> int:
    from .evaluate import evaluate
    from .model import Normalized, load_checkpoint
    from .report import format_report
    if args.checkpoint and args.checkpoint_arg and args.checkpoint != args.checkpoint_arg:
        raise UserError(f"two checkpoints given ({args.checkpoint_arg} and --checkpoint {args.checkpoint}); "
                        f"give one")
    args.checkpoint = args.checkpoint or args.checkpoint_arg
    if not args.checkpoint:
        raise UserError("no checkpoint: give CHECKPOINT (a train.py checkpoint_*.pth or best_robust.pth)")
    if not any((args.data, args.imagenet_c, args.cifar_c, args.imagenet_r, args.imagenet_a)):
        raise UserError("nothing to evaluate: give --data VAL_DIR and/or --imagenet-c / --cifar-c / "
                        "--imagenet-r / --imagenet-a")
    if args.json:
        check_output_file(args.json, "--json", args.overwrite)
    loaded = load_checkpoint(args.checkpoint, arch=args.arch, num_classes=args.num_classes)
    settings, (mean, std), preset_name = settings_from_args(args, loaded)
    settings.progress = not args.quiet
    model = Normalized(loaded.model, mean, std).to(settings.device)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    log(f"dali-ipmix eval: {loaded.arch} ({loaded.num_classes} classes) from {args.checkpoint}, "
        f"preset {preset_name}, crop {settings.image_size} (resize {settings.resize}), {settings.device}")
    if settings.pgd is not None:
        if settings.pgd.autoattack:      # before any work, not after the clean and PGD passes
            from ..attacks import check_autoattack
            check_autoattack(loaded.num_classes)
        log(eps_note(settings.pgd, loaded.args))
    report = evaluate(model, loaded.num_classes, settings, log=log)
    report = {"checkpoint": os.path.abspath(args.checkpoint), "arch": loaded.arch,
              "num_classes": loaded.num_classes, "preset": preset_name, **report}
    print(format_report(report))
    if args.json:
        try:
            write_atomic(args.json, json.dumps(report, indent=2) + "\n")
        except OSError as e:      # checked beforehand; the disk can still fill up meanwhile
            print(f"dali-ipmix eval: warning: writing --json {args.json} failed ({e.strerror or e}); "
                  f"the table above holds the results", file=sys.stderr, flush=True)
            return 1
        log(f"report written to {args.json}")
    return 0
