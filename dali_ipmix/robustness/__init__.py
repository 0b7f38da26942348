"""Robustness evaluation: clean error, common corruptions (ImageNet-C / CIFAR-C / generated) with
AlexNet-normalised mCE, RMS calibration error and ECE, ImageNet-R / -A with 200-class logit
masks, and PGD-L-inf error.  Command: ``dali-ipmix eval``; docs: ``docs/evaluation.md``.

Modules, one per concern: ``tables`` (corruption names, AlexNet errors), ``wnids`` (ImageNet /
-R / -A class lists), ``metrics``, ``corruptions`` (generated ImageNet-C corruptions),
``datasets``, ``model`` (checkpoint loading), ``evaluate`` (the report), ``report`` (text tables),
``cli``.  PGD and AutoAttack (``dali_ipmix.attacks``) and the pixel wrapper ``Normalized``
(``dali_ipmix.models``) are the library's, shared with the adversarial training mode.

Python use::

    from dali_ipmix.robustness import EvalSettings, Normalized, evaluate, load_checkpoint
    loaded = load_checkpoint("runs/x/checkpoint_00001000.pth")
    model = Normalized(loaded.model, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    report = evaluate(model, loaded.num_classes, EvalSettings(data="val", image_size=224, resize=256))
"""
from ..attacks import pgd_linf
from .evaluate import EvalSettings, Outcome, PGDSettings, evaluate, predict
from .metrics import corruption_summary, expected_calibration_error, rms_calibration_error
from .model import Loaded, Normalized, load_checkpoint
from .report import format_report
from .tables import ALEXNET_ERR, CORRUPTIONS, SEVERITIES

__all__ = [
    "pgd_linf", "EvalSettings", "PGDSettings", "Outcome", "evaluate", "predict", "corruption_summary",
    "expected_calibration_error", "rms_calibration_error", "Loaded", "Normalized", "load_checkpoint",
    "format_report", "ALEXNET_ERR", "CORRUPTIONS", "SEVERITIES",
]
