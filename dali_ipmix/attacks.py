"""The project's attacks, shared by the adversarial training mode (``advmixup``, train.py's robust
checks) and ``dali-ipmix eval`` (``robustness``): PGD-L-infinity (Madry et al., 2018) in pixel
space [0, 1], and AutoAttack 'standard' built from torchattacks.

The model takes pixels in [0, 1] (normalisation belongs inside it: see
:class:`dali_ipmix.models.Normalized`), so the attack budget ``eps`` is in pixel units.
The IPMix / PixMix CIFAR protocol is the default of the evaluation: ``eps = 2/255``, 20 steps of
``0.5/255`` from a uniform random start (``PGD(epsilon=2./255, num_steps=20, step_size=0.5/255)``
in hzlsaber/IPMix ``cifar.py``).  One difference: the official code forwards its random start
without clipping it to [0, 1] once; here the start is clipped, so every image the model sees is a
valid image.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .errors import UserError

# The IPMix / PixMix CIFAR protocol (the docstring above; docs/evaluation.md): epsilon, step size, steps.
PGD_EPS = 2 / 255
PGD_ALPHA = 0.5 / 255
PGD_STEPS = 20


def _uniform_start(x: torch.Tensor, eps: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    noise = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return (x + (2 * noise - 1) * eps).clamp_(0, 1)


def _attack_once(model, x, y, eps, alpha, steps, random_start, generator):
    x_adv = _uniform_start(x, eps, generator) if random_start else x.clone()
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        # grad w.r.t. the input only: parameter .grad fields stay untouched
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, lower), upper)   # project onto the eps-ball and [0, 1]
    return x_adv.detach()


def pgd_linf(model, x: torch.Tensor, y: torch.Tensor, eps: float = PGD_EPS, alpha: float = PGD_ALPHA,
             steps: int = PGD_STEPS, restarts: int = 1, random_start: bool = True,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Untargeted PGD-L-inf adversarial examples: ``x_adv`` with ``|x_adv - x| <= eps`` and values
    in [0, 1], maximising the cross-entropy of ``model(x_adv)`` against ``y``.

    x: float images in [0, 1] (any shape the model takes, batch first); y: int64 labels.
    Each step moves by ``alpha * sign(grad)`` then projects.  With ``restarts > 1`` every sample
    keeps the restart that fools the model, else the one with the highest loss.  ``generator``
    seeds the random starts (on its own device).  The model's train/eval mode is left as it is
    (call ``model.eval()`` first); gradients are enabled inside even under ``torch.no_grad()``.
    """
    if eps < 0 or alpha < 0 or steps < 0 or restarts < 1:
        raise ValueError(f"pgd_linf: need eps, alpha, steps >= 0 and restarts >= 1 "
                         f"(got eps={eps}, alpha={alpha}, steps={steps}, restarts={restarts})")
    x = x.detach()
    best, best_fooled, best_loss = None, None, None
    with torch.enable_grad():
        for _ in range(restarts):
            x_adv = _attack_once(model, x, y, eps, alpha, steps, random_start, generator)
            if restarts == 1:
                return x_adv
            with torch.no_grad():
                logits = model(x_adv)
                fooled = logits.argmax(1) != y
                loss = F.cross_entropy(logits, y, reduction="none")
            if best is None:
                best, best_fooled, best_loss = x_adv, fooled, loss
                continue
            better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
            shape = (-1,) + (1,) * (x.dim() - 1)
            best = torch.where(better.view(shape), x_adv, best)
            best_fooled = best_fooled | fooled
            best_loss = torch.where(better, loss, best_loss)
    return best


# ---------------------------------------------------------------------------------------------
# AutoAttack (train.py --adv-eval autoattack, dali-ipmix eval --autoattack)

AUTOATTACK_INSTALL = "pip install torchattacks==3.5.1"


def check_autoattack(num_classes: int) -> None:
    """Refuse AutoAttack where it cannot run (torchattacks missing, fewer than 4 classes): called
    before any work by train.py and `dali-ipmix eval`, and by ``autoattack_standard``."""
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        raise UserError(f"AutoAttack needs the torchattacks package: {AUTOATTACK_INSTALL} "
                        f"(or evaluate with PGD only)") from None
    if num_classes < 4:    # APGD-T's targeted DLR loss reads the 3rd and 4th largest logits
        raise UserError(f"AutoAttack's targeted attacks need a model with >= 4 classes, this one has "
                        f"{num_classes}; evaluate it with PGD only")


def autoattack_standard(model, eps: float, num_classes: int, seed: int = 0):
    """AutoAttack 'standard' (Croce & Hein) built from torchattacks 3.5.1 parts with the official
    settings, which torchattacks' own ``AutoAttack`` does not use (it keeps 10 iterations and
    ``n_classes - 1`` targets): APGD-CE and APGD-T (100 iterations), FAB-T (100 iterations),
    Square (5000 queries, p_init 0.8, no schedule rescaling); 9 target classes (fewer if the
    model has fewer than 10 classes).  Applied in sequence to the images not yet fooled."""
    check_autoattack(num_classes)
    import torchattacks as ta
    n = min(num_classes, 10)    # torchattacks runs n - 1 targets; official AA uses 9
    attacks = [
        ta.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", rho=0.75, seed=seed),
        ta.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, rho=0.75, n_classes=n, seed=seed),
        ta.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1, multi_targeted=True,
               n_classes=n, seed=seed),
        ta.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, p_init=0.8,
                  resc_schedule=False, seed=seed),
    ]
    return ta.MultiAttack(attacks)


def describe_autoattack(attack) -> str:
    """What ``autoattack_standard`` built, in one line for reports: the library version and each attack's budget."""
    apgd, apgdt, fab, square = attack.attacks
    return (f"torchattacks {_torchattacks_version()}: APGD-CE ({apgd.steps} it), APGD-T ({apgdt.steps} it, "
            f"{apgdt.n_target_classes} targets), FAB-T ({fab.steps} it, {fab.n_target_classes} targets), "
            f"Square ({square.n_queries} queries)")


def _torchattacks_version() -> str:
    import torchattacks
    return getattr(torchattacks, "__version__", "?")
