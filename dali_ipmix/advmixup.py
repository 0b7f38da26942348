"""Adversarial mixup training (``--adv-mixup {off,aom,mixup_pgd}``) and robust evaluation.

The method is the project's reconstruction of "Adversarially Optimized Mixup" (Bunk et al.,
arXiv 2103.11589; docs/adversarial.md): the paper's method section could not be read, so every
component its abstract names is a switch.  ``mixup_pgd`` is the fixed baseline
(Rice et al.'s mixup + PGD: mixed probe, lambda fixed, label = lambda, cross-entropy).

Inputs are pixels in [0, 1] (the pipeline built with ``pixel_config(cfg)``) and the model starts
with its normalisation layer (``with_normalization``), so epsilon is in pixel units and the clamp
to [0, 1] is exact.

What train.py calls, each documented where it is defined: ``add_adv_args`` and
``resolve_adv_flags`` (the ``--adv-*`` flags, errors as ``errors.UserError``; ``check_adv_args``
fills a parsed Namespace with them), ``AdvConfig`` (one run's switches), ``uses_pixels`` and
``pixel_config`` (pipelines that emit [0, 1] pixels), ``with_normalization``, ``adv_mixup_loss``
(one training step's loss), ``spread_batches`` and ``robust_eval`` (clean / PGD / AutoAttack
accuracy); ``pgd_linf`` is the project's one PGD (``attacks``, shared with ``dali-ipmix eval``).
"""
from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attacks
from .attacks import check_autoattack, describe_autoattack, pgd_linf  # noqa: F401  (train.py: check_autoattack)
from .errors import UserError
from .models import Normalized

MODES = ("off", "aom", "mixup_pgd")
PROBES = ("mixed", "endpoints")
LABEL_RULES = ("lambda", "projection", "distance")
OBJECTIVES = ("kl_target", "ce", "kl_interp")
BN_MODES = ("frozen", "train")
EVAL_MODES = ("off", "pgd", "autoattack")
ON_OFF = ("on", "off")

# Switches that differ between the modes; a switch left unset takes its mode's value.
MODE_DEFAULTS = {
    "aom": dict(adv_probe="mixed", adv_opt_lambda="on", adv_label_rule="projection",
                adv_objective="kl_target"),
    "mixup_pgd": dict(adv_probe="mixed", adv_opt_lambda="off", adv_label_rule="lambda",
                      adv_objective="ce"),
}
# Mode-independent defaults (CIFAR eps 8/255, alpha = eps/4 as Rice et al. 2020; Beta(1, 1); lam_step 0.1).
COMMON_DEFAULTS = dict(adv_eps=8 / 255, adv_steps=10, adv_pgd_weight=0.0, adv_clean_weight=0.0,
                       adv_bn="frozen", adv_mix_alpha=1.0, adv_lambda_step=0.1,
                       adv_lambda_box=(0.0, 1.0))
TRAINING_FLAGS = tuple(MODE_DEFAULTS["aom"]) + tuple(COMMON_DEFAULTS) + ("adv_step_size",)
# The per-epoch robust check that picks best_robust.pth: PGD-10 on a fixed validation subset,
# Rice et al. 2020's model selection against robust overfitting (their validation split: 1000 images).
SELECT_STEPS = 10
SELECT_IMAGES = 1000

PIXEL_MEAN = (0.0, 0.0, 0.0)
PIXEL_STD = (1.0, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Command-line flags

def pixels(text: str) -> float:
    """A pixel-unit amount: ``0.03137`` or a fraction such as ``8/255``."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction like 8/255") from None


def add_adv_args(parser: argparse.ArgumentParser):
    """Add the ``adversarial mixup`` argument group; returns it."""
    g = parser.add_argument_group("adversarial mixup (docs/adversarial.md)")
    g.add_argument("--adv-mixup", choices=MODES, default=None,
                   help="training mode: aom = adversarially optimised mixup (the project's "
                   "reconstruction), mixup_pgd = mixup + PGD baseline; needs [0, 1] pixels "
                   "(default off)")
    g.add_argument("--adv-eps", type=pixels, default=None, metavar="E",
                   help="L-inf radius in pixel units, e.g. 8/255 (default 8/255)")
    g.add_argument("--adv-step-size", type=pixels, default=None, metavar="A",
                   help="PGD sign-step size (default eps/4)")
    g.add_argument("--adv-steps", type=int, default=None, metavar="K",
                   help="attack steps per training step (default 10; 1 = FGSM with random start)")
    g.add_argument("--adv-probe", choices=PROBES, default=None,
                   help="perturb the mixed point or both endpoints (default mixed)")
    g.add_argument("--adv-opt-lambda", choices=ON_OFF, default=None,
                   help="also ascend the mixing ratio lambda (aom default on; mixup_pgd: off)")
    g.add_argument("--adv-label-rule", choices=LABEL_RULES, default=None,
                   help="weight of the first label: lambda, projection of the probed point onto "
                   "the segment, or distance ratio (aom default projection; mixup_pgd: lambda)")
    g.add_argument("--adv-objective", choices=OBJECTIVES, default=None,
                   help="attack loss: kl_target = KL(mixed label || prediction), i.e. soft "
                   "cross-entropy minus the label's entropy; ce = soft cross-entropy (it also "
                   "rewards uncertain labels, pulling lambda to 0.5); kl_interp = KL(interpolated "
                   "endpoint predictions || prediction at the probe) (aom default kl_target; "
                   "mixup_pgd: ce)")
    g.add_argument("--adv-pgd-weight", type=float, default=None, metavar="W",
                   help="weight of an added PGD-AT term CE(f(PGD_K(x)), y) (default 0)")
    g.add_argument("--adv-clean-weight", type=float, default=None, metavar="W",
                   help="weight of an added clean term CE(f(x), y) (default 0)")
    g.add_argument("--adv-bn", choices=BN_MODES, default=None,
                   help="batch norm during the attack: frozen (eval mode) or train (Rice et "
                   "al.: running statistics updated by every attack step) (default frozen)")
    g.add_argument("--adv-mix-alpha", type=float, default=None, metavar="A",
                   help="lambda ~ Beta(A, A), one per sample (default 1)")
    g.add_argument("--adv-lambda-step", type=float, default=None, metavar="S",
                   help="sign-step of lambda when optimised (default 0.1)")
    g.add_argument("--adv-lambda-box", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="lambda is drawn in and kept inside [LO, HI] (default 0 1)")
    g.add_argument("--adv-jsd", action="store_true",
                   help="keep IPMix's JSD triple (clean + 2 views, JSD loss) in an adversarial "
                   "mode; by default the mode trains on one IPMix view")
    g.add_argument("--adv-eval-every", type=int, default=None, metavar="N",
                   help=f"every N epochs (and after the last), PGD-{SELECT_STEPS} accuracy at the "
                   "evaluation radius on a fixed validation subset, logged per epoch; the most "
                   "robust model is kept as best_robust.pth (default 1 with --adv-mixup, else 0 = off)")
    g.add_argument("--adv-val-images", type=int, default=SELECT_IMAGES, metavar="N",
                   help="size of that subset, spread evenly over the validation list (0 = all)")
    g.add_argument("--adv-eval", choices=EVAL_MODES, default="off",
                   help="robust evaluation of the final model, in float32: PGD, or PGD + AutoAttack "
                   "(torchattacks, official standard settings); needs [0, 1] pixels")
    g.add_argument("--adv-eval-eps", type=pixels, default=None, metavar="E",
                   help="evaluation radius (default: --adv-eps, i.e. 8/255)")
    g.add_argument("--adv-eval-step-size", type=pixels, default=None, metavar="A",
                   help="evaluation PGD step (default eval eps/4)")
    g.add_argument("--adv-eval-steps", type=int, default=20, metavar="K", help="evaluation PGD steps")
    g.add_argument("--adv-eval-restarts", type=int, default=1, metavar="R",
                   help="evaluation PGD restarts (the worst per image is kept)")
    g.add_argument("--adv-eval-images", type=int, default=0, metavar="N",
                   help="evaluate the final model on N validation images spread evenly over the "
                   "list (0 = all)")
    return g


def resolve_adv_flags(flags: Mapping[str, Any]) -> dict:
    """Validate the ``--adv-*`` flags of ``flags`` (a flag name -> value mapping) and fill in their
    defaults: returns the values that change (``adv_*`` and ``no_jsd``), ``flags`` stays as it is.

    Idempotent: the filled flags resolve to no change."""
    args = argparse.Namespace(**flags)      # filled in below: a copy, the caller's flags stay
    if args.adv_mixup is None:
        args.adv_mixup = "off"
    mode = args.adv_mixup
    if mode not in MODES:
        raise UserError(f"--adv-mixup {mode!r}: choose one of {', '.join(MODES)}")
    if args.adv_eval not in EVAL_MODES:
        raise UserError(f"--adv-eval {args.adv_eval!r}: choose one of {', '.join(EVAL_MODES)}")
    if mode == "off":
        # the training switches stay unset (None); --adv-eps still sets the evaluation radius
        unused = [f for f in TRAINING_FLAGS if getattr(args, f, None) is not None
                  and not (f == "adv_eps" and (args.adv_eval != "off" or args.adv_eval_every))]
        if unused:
            raise UserError(f"--{unused[0].replace('_', '-')} has no effect without "
                            f"--adv-mixup aom or --adv-mixup mixup_pgd")
        if args.adv_jsd:
            raise UserError("--adv-jsd has no effect without --adv-mixup aom or --adv-mixup mixup_pgd")
        if (args.adv_eval != "off" or args.adv_eval_every) and args.adv_eps is None:
            args.adv_eps = COMMON_DEFAULTS["adv_eps"]
    else:
        for key, value in MODE_DEFAULTS[mode].items():
            if getattr(args, key) is None:
                setattr(args, key, value)
            elif mode == "mixup_pgd" and getattr(args, key) != value:
                raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)}: mixup_pgd is the "
                                f"fixed baseline ({key.replace('_', '-')} {value}); use --adv-mixup aom "
                                f"to change it")
        for key, value in COMMON_DEFAULTS.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
        if args.adv_step_size is None:
            args.adv_step_size = args.adv_eps / 4
        # one IPMix view unless asked: the JSD triple would triple every attacked batch
        if getattr(args, "no_jsd", False) and args.adv_jsd:
            raise UserError("--no-jsd and --adv-jsd contradict each other; give one")
        args.no_jsd = not args.adv_jsd
    if args.adv_eval_every is None:
        args.adv_eval_every = 0 if mode == "off" else 1
    eval_eps = args.adv_eps if args.adv_eps is not None else COMMON_DEFAULTS["adv_eps"]
    if args.adv_eval_eps is None:
        args.adv_eval_eps = eval_eps
    if args.adv_eval_step_size is None:
        args.adv_eval_step_size = args.adv_eval_eps / 4
    if args.adv_eps is not None:
        _need(0 <= args.adv_eps <= 1, "adv-eps", f"must be in [0, 1] pixel units (e.g. 8/255), got {args.adv_eps:g}")
    _need(0 <= args.adv_eval_eps <= 1, "adv-eval-eps", f"must be in [0, 1], got {args.adv_eval_eps:g}")
    _need(0 <= args.adv_eval_step_size <= 1, "adv-eval-step-size", f"must be in [0, 1], got {args.adv_eval_step_size:g}")
    _need(args.adv_eval_steps >= 0, "adv-eval-steps", f"must be >= 0, got {args.adv_eval_steps}")
    _need(args.adv_eval_restarts >= 1, "adv-eval-restarts", f"must be >= 1, got {args.adv_eval_restarts}")
    _need(args.adv_eval_images >= 0, "adv-eval-images", f"must be >= 0, got {args.adv_eval_images}")
    _need(args.adv_eval_every >= 0, "adv-eval-every", f"must be >= 0 (0 = off), got {args.adv_eval_every}")
    _need(args.adv_val_images >= 0, "adv-val-images", f"must be >= 0, got {args.adv_val_images}")
    if mode != "off":
        _check_training_switches(args)
    return {k: v for k, v in vars(args).items() if k not in flags or v != flags[k]}


def _need(ok, flag, what):
    if not ok:
        raise UserError(f"--{flag} {what}")


def _check_training_switches(args):
    """The switches of an adversarial training mode, in range (the lambda box as a float pair)."""
    _need(0 <= args.adv_step_size <= 1, "adv-step-size", f"must be in [0, 1], got {args.adv_step_size:g}")
    _need(args.adv_steps >= 0, "adv-steps", f"must be >= 0, got {args.adv_steps}")
    # NaN fails every test; inf is refused too (a weight or step of inf is no setting anyone means)
    _need(0 <= args.adv_pgd_weight < math.inf, "adv-pgd-weight", f"must be a finite number >= 0, got {args.adv_pgd_weight:g}")
    _need(0 <= args.adv_clean_weight < math.inf, "adv-clean-weight",
         f"must be a finite number >= 0, got {args.adv_clean_weight:g}")
    _need(0 < args.adv_mix_alpha < math.inf, "adv-mix-alpha", f"must be a finite number > 0, got {args.adv_mix_alpha:g}")
    _need(0 <= args.adv_lambda_step <= 1, "adv-lambda-step",
         f"must be in [0, 1] (a step of the mixing weight lambda), got {args.adv_lambda_step:g}")
    lo, hi = args.adv_lambda_box
    _need(0 <= lo <= hi <= 1, "adv-lambda-box", f"needs 0 <= LO <= HI <= 1, got {lo:g} {hi:g}")
    args.adv_lambda_box = (float(lo), float(hi))


def check_adv_args(args: argparse.Namespace) -> argparse.Namespace:
    """``resolve_adv_flags`` applied to a Namespace parsed with ``add_adv_args`` (scripts, tests):
    fills it in place and returns it."""
    vars(args).update(resolve_adv_flags(vars(args)))
    return args


def uses_pixels(*, adv_mixup: str, adv_eval: str = "off", adv_eval_every: int = 0) -> bool:
    """True when the pipeline must emit [0, 1] pixels and the model must be wrapped by
    ``with_normalization``: an adversarial training mode, a robust evaluation or the per-epoch check."""
    return adv_mixup != "off" or adv_eval != "off" or bool(adv_eval_every)


def pixel_config(cfg):
    """``cfg`` whose pipelines emit [0, 1] pixels: normalising with mean 0 and std 1 is the
    identity on x / 255 (crop_mirror_normalize with mean 0, std 255; the fused kernel likewise)."""
    return cfg.replace(mean=PIXEL_MEAN, std=PIXEL_STD)


@dataclass(frozen=True)
class AdvConfig:
    """The resolved switches of one run (``from_args``), what ``adv_mixup_loss`` takes."""
    mode: str
    eps: float
    step_size: float
    steps: int
    probe: str = "mixed"
    opt_lambda: bool = False
    label_rule: str = "lambda"
    objective: str = "ce"
    pgd_weight: float = 0.0
    clean_weight: float = 0.0
    bn: str = "frozen"
    mix_alpha: float = 1.0
    lambda_step: float = 0.1
    lambda_box: Tuple[float, float] = (0.0, 1.0)
    label_smoothing: float = 0.0
    jsd_weight: float = 12.0

    @classmethod
    def from_args(cls, args) -> "AdvConfig":
        """The switches of ``args``: any object with the ``--adv-*`` flags as attributes (a parsed
        Namespace, train.py's ``RunConfig``), read only; unset switches take their defaults."""
        args = argparse.Namespace(**{**vars(args), **resolve_adv_flags(vars(args))})
        return cls(mode=args.adv_mixup, eps=args.adv_eps, step_size=args.adv_step_size,
                   steps=args.adv_steps, probe=args.adv_probe, opt_lambda=args.adv_opt_lambda == "on",
                   label_rule=args.adv_label_rule, objective=args.adv_objective,
                   pgd_weight=args.adv_pgd_weight, clean_weight=args.adv_clean_weight, bn=args.adv_bn,
                   mix_alpha=args.adv_mix_alpha, lambda_step=args.adv_lambda_step,
                   lambda_box=tuple(args.adv_lambda_box),
                   label_smoothing=getattr(args, "label_smoothing", 0.0) or 0.0,
                   jsd_weight=getattr(args, "jsd_weight", 12.0))


# ---------------------------------------------------------------------------------------------
# The model takes pixels

def with_normalization(model: nn.Module, mean, std) -> nn.Module:
    """``model`` fed [0, 1] pixels: ``Normalized(model, mean, std)`` (``models.Normalized``, the
    wrapper, one class for training and evaluation); ``.model`` is the bare network."""
    return Normalized(model, mean, std)


def has_normalization(model: nn.Module) -> bool:
    """True if ``model`` takes [0, 1] pixels (a ``Normalized`` wrapper, possibly inside DDP or
    ``torch.compile``)."""
    model = getattr(model, "_orig_mod", model)      # torch.compile wrapper
    model = getattr(model, "module", model)         # DDP wrapper
    return isinstance(model, Normalized)


def _check_model(model, who):
    if not has_normalization(model):
        raise ValueError(f"{who}: the model must take [0, 1] pixels (use with_normalization(model, "
                         f"mean, std)) so that it takes [0, 1] pixels and eps is in pixel units")


_PIXELS_CHECKED = set()


def _check_pixels(x: torch.Tensor, who: str):
    # a host sync: done on every CPU call, once per device type on an accelerator
    if x.device.type != "cpu" and x.device.type in _PIXELS_CHECKED:
        return
    lo, hi = torch.aminmax(x.detach())
    if lo.item() < -1e-3 or hi.item() > 1 + 1e-3:
        raise ValueError(f"{who}: inputs span [{lo.item():.3g}, {hi.item():.3g}], expected pixels in "
                         f"[0, 1]; build the pipeline with pixel_config(cfg)")
    _PIXELS_CHECKED.add(x.device.type)


# ---------------------------------------------------------------------------------------------
# Replayable draws

def replay_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A 63-bit seed from (seed, epoch, step, rank) via NumPy's SeedSequence hash (no collisions
    between neighbouring tuples, unlike a linear formula)."""
    words = np.random.SeedSequence([int(seed), int(epoch), int(step), int(rank)]).generate_state(2, np.uint32)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & (2 ** 63 - 1)


def replay_generator(seed: int, epoch: int, step: int, rank: int, device="cpu") -> torch.Generator:
    """The generator of every draw of one (seed, epoch, step, rank): pairing, lambda, noise."""
    g = torch.Generator(device=device)
    g.manual_seed(replay_seed(seed, epoch, step, rank))
    return g


def draw_pairs(batch: int, generator: torch.Generator, mix_alpha: float = 1.0,
               lambda_box=(0.0, 1.0)) -> Tuple[torch.Tensor, torch.Tensor]:
    """Partner permutation and one lambda per sample (Beta(a, a) scaled into the box), on CPU.

    Draw order: the permutation, then one int64 that seeds the Beta sampler (torch's Beta takes no
    generator; it runs under a forked, re-seeded global RNG so the global state is untouched)."""
    perm = torch.randperm(batch, generator=generator)
    beta_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(beta_seed)
        a = torch.tensor(float(mix_alpha), dtype=torch.float64)
        u = torch.distributions.Beta(a, a).sample((batch,))
    lo, hi = lambda_box
    return perm, (lo + (hi - lo) * u).float()


def random_start(x: torch.Tensor, eps: float, n: int, generator: torch.Generator):
    """``n`` uniform perturbations in [-eps, eps] of ``x``'s shape, drawn on x's device."""
    return tuple((torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
                 for _ in range(n))


# ---------------------------------------------------------------------------------------------
# The probe: PGD through the mixup interpolation (docs/adversarial.md)

@dataclass
class Probe:
    x: torch.Tensor          # probed points [B, 3, H, W] in [0, 1] (detached)
    target: torch.Tensor     # soft labels [B, C], rows sum to 1
    lam: torch.Tensor        # final lambda [B]
    t: torch.Tensor          # weight of the first label [B]
    deltas: tuple            # (d,) mixed, (da, db) endpoints
    losses: torch.Tensor     # [K] mean attack loss at each step's probe point


def _context(autocast_ctx):
    if autocast_ctx is None:
        return contextlib.nullcontext()
    if hasattr(autocast_ctx, "__enter__"):
        return autocast_ctx
    return autocast_ctx()


@contextlib.contextmanager
def frozen_batchnorm(model: nn.Module, enabled: bool = True):
    """Batch-norm layers in eval mode (running statistics used, not updated), restored after."""
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training] if enabled else []
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m in layers:
            m.train()


def _mix(lam, xa, xb):
    lam = lam.view(-1, *([1] * (xa.dim() - 1)))
    return lam * xa + (1 - lam) * xb


def probe_point(xa, xb, lam, deltas):
    """The probed image: clamp(mix(xa, xb) + d) or clamp(mix(xa + da, xb + db))."""
    if len(deltas) == 1:
        return (_mix(lam, xa, xb) + deltas[0]).clamp(0, 1)
    return _mix(lam, xa + deltas[0], xb + deltas[1]).clamp(0, 1)


def _project(deltas, lam, xa, xb, eps):
    """Into the eps-ball, then so that the perturbed image (mixed) or endpoints stay in [0, 1]."""
    if len(deltas) == 1:
        base = _mix(lam, xa, xb)
        return ((base + deltas[0].clamp(-eps, eps)).clamp(0, 1) - base,)
    return tuple((x + d.clamp(-eps, eps)).clamp(0, 1) - x for x, d in zip((xa, xb), deltas))


def label_weight(rule: str, xm, xa, xb, lam):
    """t, the weight of xa's label at the probed point xm (xa, xb clean endpoints).

    projection: <xm - xb, xa - xb> / |xa - xb|^2 clamped to [0, 1]; distance:
    |xm - xb| / (|xm - xa| + |xm - xb|).  Both equal lambda on the segment; where the endpoints
    coincide (a sample paired with itself) they fall back to lambda."""
    if rule == "lambda":
        return lam
    tiny = 1e-12
    diff = (xa - xb).flatten(1)
    seg2 = diff.pow(2).sum(1)                 # squared length of the segment
    if rule == "projection":
        t = ((xm - xb).flatten(1) * diff).sum(1) / seg2.clamp_min(tiny)
        return torch.where(seg2 > tiny, t.clamp(0, 1), lam)
    if rule == "distance":
        to_a = (xm - xa).flatten(1).norm(dim=1)
        to_b = (xm - xb).flatten(1).norm(dim=1)
        t = to_b / (to_a + to_b).clamp_min(tiny)
        return torch.where(seg2 > tiny, t, lam)
    raise ValueError(f"label rule {rule!r}: choose one of {', '.join(LABEL_RULES)}")


def soft_targets(t, ya, yb, label_smoothing=0.0):
    t = t.view(-1, 1)
    y = t * ya + (1 - t) * yb
    if label_smoothing:
        y = y * (1 - label_smoothing) + label_smoothing / y.shape[1]
    return y


def soft_cross_entropy(logits, target):
    """Per-sample ``-sum target * log_softmax(logits)`` in float32."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(1)


def _attack_loss(logits, target, t, p_a, p_b, objective):
    if objective == "ce":
        return soft_cross_entropy(logits, target)
    if objective == "kl_target":
        # soft CE minus the target's entropy: CE alone climbs towards lambda = 0.5 wherever the
        # model fits mixup, because the label itself is most uncertain there
        return soft_cross_entropy(logits, target) + (target * target.clamp_min(1e-12).log()).sum(1)
    # kl_interp: KL(t p(xa) + (1 - t) p(xb) || p(xm)): how far the prediction at the probe is
    # from the interpolation of the endpoint predictions (the "unsmooth" reading of the abstract)
    p = t.view(-1, 1) * p_a + (1 - t.view(-1, 1)) * p_b
    return (p * (p.clamp_min(1e-12).log() - F.log_softmax(logits.float(), dim=1))).sum(1)


def probe(model, x, y_onehot, perm, lam, init, cfg: AdvConfig, autocast_ctx=None) -> Probe:
    """K sign-gradient ascent steps on the perturbation(s) ``init`` (and lambda if
    ``cfg.opt_lambda``) of the mixup of ``x`` with ``x[perm]``; parameters are not touched.

    ``init``: ``(d,)`` perturbs the mixed point, ``(da, db)`` the endpoints (``cfg.probe`` is not
    read here).  Perturbations and lambda are kept in float32 (or x's dtype if wider) whatever
    the autocast dtype of the model.  Returns the final point with its (detached) soft label."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    xa = x.detach().to(dtype)
    xb = xa[perm]
    ya, yb = y_onehot.to(dtype), y_onehot.to(dtype)[perm]
    lam = lam.detach().to(device=x.device, dtype=dtype)
    lo, hi = cfg.lambda_box
    deltas = _project([d.detach().to(dtype) for d in init], lam, xa, xb, cfg.eps)
    p_a = p_b = None
    if cfg.objective == "kl_interp":
        with torch.no_grad(), _context(autocast_ctx):
            p_a = F.softmax(model(xa).float(), dim=1).to(dtype)
        p_b = p_a[perm]
    losses = []
    with torch.enable_grad():
        for _ in range(cfg.steps):
            deltas = tuple(d.requires_grad_(True) for d in deltas)
            lam_v = lam.clone().requires_grad_(cfg.opt_lambda)
            xm = probe_point(xa, xb, lam_v, deltas)
            t = label_weight(cfg.label_rule, xm, xa, xb, lam_v)
            with _context(autocast_ctx):
                logits = model(xm)
            loss = _attack_loss(logits, soft_targets(t, ya, yb, cfg.label_smoothing), t, p_a, p_b,
                                cfg.objective)
            wrt = list(deltas) + ([lam_v] if cfg.opt_lambda else [])
            grads = torch.autograd.grad(loss.sum(), wrt)
            losses.append(loss.detach().mean())
            with torch.no_grad():
                if cfg.opt_lambda:
                    lam = (lam + cfg.lambda_step * grads[-1].sign()).clamp(lo, hi)
                deltas = tuple(d.detach() + cfg.step_size * g.sign() for d, g in zip(deltas, grads))
                deltas = _project(deltas, lam, xa, xb, cfg.eps)
    with torch.no_grad():
        xm = probe_point(xa, xb, lam, deltas)
        t = label_weight(cfg.label_rule, xm, xa, xb, lam)
        target = soft_targets(t, ya, yb, cfg.label_smoothing)
    stacked = torch.stack(losses) if losses else torch.zeros(0, device=x.device)
    return Probe(x=xm, target=target, lam=lam, t=t, deltas=tuple(d.detach() for d in deltas),
                 losses=stacked)


# ---------------------------------------------------------------------------------------------
# The training loss

def adv_mixup_loss(model_unwrapped, model_for_grad, images01, labels, num_classes, cfg: AdvConfig, *,
                   seed, epoch, step, rank, autocast_ctx=None, views=1):
    """(loss, info) of one training step in ``--adv-mixup aom|mixup_pgd``.

    loss = soft_CE(f(x_probe), y_probe) + pgd_weight * CE(f(PGD_K(x)), y)
           + clean_weight * CE(f(x), y) [+ IPMix JSD loss when views == 3]

    Pairs, lambda and noise come from ``replay_generator``; the attack runs on
    ``model_unwrapped`` (no DDP hooks, no parameter gradients, BN layers in eval mode unless
    ``--adv-bn train``); the training loss is ONE forward of everything through
    ``model_for_grad`` (the DDP/compiled model), so gradients are all-reduced once by the
    caller's ``loss.backward()``.  ``images01``: ``[B*views, 3, H, W]`` sample-major (what
    ``DaliLoader`` yields); with ``views=3`` (IPMix JSD triple: clean, aug1, aug2) the pairs are
    built from aug1 and the IPMix JSD loss (``losses.jsd_loss``) is added.  ``info``: detached
    tensors (no host sync): ``lam_mean/std/min/max``, ``lam_shift`` (mean |lambda - lambda0|),
    ``label_weight_mean``, ``label_gap`` (mean |t - lambda|), ``attack_loss`` [K] (mean attack
    loss at each step's probe point), ``loss_mix``, ``loss_pgd``, ``loss_clean``, ``loss_jsd``
    (present when used), ``correct`` (probed points whose argmax is the dominant label), ``n``,
    ``perm``, ``lam``.
    """
    if cfg.mode == "off":
        raise ValueError("adv_mixup_loss called with --adv-mixup off")
    _check_model(model_unwrapped, "adv_mixup_loss")
    _check_pixels(images01, "adv_mixup_loss")
    batch = labels.shape[0]
    if views not in (1, 3) or images01.shape[0] != batch * views:
        raise ValueError(f"adv_mixup_loss: {images01.shape[0]} images for {batch} labels and views={views}")
    x = images01 if views == 1 else images01.unflatten(0, (batch, views))[:, 1]
    # a dense copy of the strided view (keeps channels_last): the attack reads it 2K times
    x = x.to(torch.promote_types(x.dtype, torch.float32), memory_format=torch.preserve_format,
             copy=views != 1)

    g_cpu = replay_generator(seed, epoch, step, rank)
    g_dev = g_cpu if x.device.type == "cpu" else replay_generator(seed, epoch, step, rank, x.device)
    perm, lam0 = draw_pairs(batch, g_cpu, cfg.mix_alpha, cfg.lambda_box)
    perm, lam0 = perm.to(x.device), lam0.to(x.device)
    init = random_start(x, cfg.eps, 2 if cfg.probe == "endpoints" else 1, g_dev)
    y1h = F.one_hot(labels, num_classes).to(x.dtype)

    with frozen_batchnorm(model_unwrapped, cfg.bn == "frozen"):
        pr = probe(model_unwrapped, x, y1h, perm, lam0, init, cfg, autocast_ctx)
        x_pgd = None
        if cfg.pgd_weight > 0:
            with _context(autocast_ctx):
                x_pgd = pgd_linf(model_unwrapped, x, labels, cfg.eps, cfg.step_size, cfg.steps,
                                 restarts=1, random_start=True, generator=g_dev)

    # one forward of every training input through the DDP model: one backward, one all-reduce
    parts = [("mix", pr.x.to(x.dtype))]
    if x_pgd is not None:
        parts.append(("pgd", x_pgd))
    if views == 3:
        parts.append(("views", images01.to(x.dtype)))
    elif cfg.clean_weight > 0:
        parts.append(("clean", x))
    with _context(autocast_ctx):
        logits = model_for_grad(torch.cat([p for _, p in parts]))
    chunks = dict(zip([n for n, _ in parts], logits.float().split([p.shape[0] for _, p in parts])))

    info = {}
    loss = info["loss_mix"] = soft_cross_entropy(chunks["mix"], pr.target).mean()
    ls = cfg.label_smoothing
    if x_pgd is not None:
        info["loss_pgd"] = F.cross_entropy(chunks["pgd"], labels, label_smoothing=ls)
        loss = loss + cfg.pgd_weight * info["loss_pgd"]
    if views == 3:
        from .losses import jsd_loss
        clean, aug1, aug2 = chunks["views"].view(batch, 3, -1).unbind(1)
        info["loss_jsd"] = jsd_loss(clean, aug1, aug2, labels, weight=cfg.jsd_weight, label_smoothing=ls)
        loss = loss + info["loss_jsd"]
        chunks["clean"] = aug1
    if cfg.clean_weight > 0:
        info["loss_clean"] = F.cross_entropy(chunks["clean"], labels, label_smoothing=ls)
        loss = loss + cfg.clean_weight * info["loss_clean"]

    dominant = torch.where(pr.t >= 0.5, labels, labels[perm])
    lam = pr.lam
    info.update({k: v.detach() for k, v in info.items()})
    info.update(
        lam_mean=lam.mean(), lam_std=lam.std(unbiased=False), lam_min=lam.min(), lam_max=lam.max(),
        lam_shift=(lam - lam0).abs().mean(), label_weight_mean=pr.t.mean(),
        label_gap=(pr.t - lam).abs().mean(), attack_loss=pr.losses,
        correct=(chunks["mix"].detach().argmax(1) == dominant).sum(), n=batch, perm=perm, lam=lam)
    return loss, info


# ---------------------------------------------------------------------------------------------
# Robust evaluation

def spread_batches(loader, total: int, keep: int):
    """``loader``'s ``(x, y)`` batches cut to ``keep`` of its ``total`` samples, evenly spaced over
    the stream (``readers.subset_indices``): validation lists are sorted by class, so
    the first ``keep`` would cover only the first classes.  The whole loader is consumed (a DALI
    iterator left mid-epoch would resume there next time), so the subset is the same every pass."""
    from .readers import subset_indices
    if not keep or keep >= total:
        yield from loader
        return
    chosen = torch.from_numpy(subset_indices(total, keep))
    start = 0
    for x, y in loader:
        rows = chosen[(chosen >= start) & (chosen < start + y.shape[0])] - start
        start += y.shape[0]
        if rows.numel():
            rows = rows.to(y.device)
            yield x[rows], y[rows]


def robust_eval(model, loader, eps, alpha, steps, restarts=1, autoattack=False, *, max_images=0,
                seed=0, autocast_ctx=None, log=None) -> dict:
    """Clean, PGD and (optionally) AutoAttack accuracy of ``model`` (which starts with
    its normalisation: ``with_normalization``) on ``loader``'s ``(images [B, 3, H, W] in [0, 1], labels)``.

    An image counts as robust only if it is classified correctly clean AND after the attack
    (the clean point is inside the ball).  ``worst``: robust to both PGD and AutoAttack.
    ``max_images``: the first N of the loader (``spread_batches`` picks a spread subset).
    PGD runs under ``autocast_ctx`` if given, which is for quick looks only: input gradients in
    bf16/fp16 can underflow and weaken the attack, so reported numbers use None (float32).
    AutoAttack always runs in float32.  Returns percentages
    (``clean``, ``pgd``, ``autoattack``, ``worst``), the gaps ``clean_minus_pgd`` and
    ``pgd_minus_aa`` (a large PGD-AA gap means PGD was fooled by gradient masking), the raw
    counts ``n_*`` (to all-reduce over ranks) and the settings.  The model's mode is restored.
    """
    _check_model(model, "robust_eval")
    was_training = model.training
    model.eval()
    n = {"images": 0, "clean": 0, "pgd": 0, "autoattack": 0, "worst": 0}
    attack = None
    try:
        for i, (x, y) in enumerate(loader):
            if max_images and n["images"] >= max_images:
                break
            if max_images:
                x, y = x[:max_images - n["images"]], y[:max_images - n["images"]]
            if y.numel() == 0:
                continue
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            _check_pixels(x, "robust_eval")
            with torch.no_grad(), _context(autocast_ctx):
                clean_logits = model(x)
                ok_clean = clean_logits.argmax(1) == y
            g = replay_generator(seed, 0, i, 0, device=x.device)
            with _context(autocast_ctx):
                x_adv = pgd_linf(model, x, y, eps, alpha, steps, restarts=restarts, random_start=True,
                                 generator=g)
            with torch.no_grad(), _context(autocast_ctx):
                ok_pgd = ok_clean & (model(x_adv).argmax(1) == y)
            ok_worst = ok_pgd
            if autoattack:
                if attack is None:
                    attack = attacks.autoattack_standard(model, eps, clean_logits.shape[1], seed)
                devices = [x.device.index or 0] if x.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):    # torchattacks re-seeds the global RNG
                    x_aa = attack(x.contiguous(), y)     # FAB .view()s gradients shaped like x
                model.eval()
                with torch.no_grad():
                    ok_aa = ok_clean & (model(x_aa).argmax(1) == y)
                n["autoattack"] += int(ok_aa.sum())
                ok_worst = ok_pgd & ok_aa
            n["images"] += y.numel()
            n["clean"] += int(ok_clean.sum())
            n["pgd"] += int(ok_pgd.sum())
            n["worst"] += int(ok_worst.sum())
            if log is not None:
                log(f"robust eval: {n['images']} images, clean {n['clean']}, PGD {n['pgd']}"
                    + (f", AutoAttack {n['autoattack']}" if autoattack else ""))
    finally:
        model.train(was_training)
    total = max(n["images"], 1)
    pct = {k: 100.0 * n[k] / total for k in ("clean", "pgd", "autoattack", "worst")}
    out = {"images": n["images"], "clean": pct["clean"], "pgd": pct["pgd"],
           "autoattack": pct["autoattack"] if autoattack else None,
           "worst": pct["worst"], "clean_minus_pgd": pct["clean"] - pct["pgd"],
           "pgd_minus_aa": pct["pgd"] - pct["autoattack"] if autoattack else None,
           "eps": eps, "alpha": alpha, "steps": steps, "restarts": restarts,
           "autoattack_impl": describe_autoattack(attack) if attack is not None else None}
    out.update({f"n_{k}": v for k, v in n.items() if k != "images" and (autoattack or k != "autoattack")})
    return out
