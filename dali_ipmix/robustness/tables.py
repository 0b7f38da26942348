"""Published constants of the corruption benchmarks, defined once.

``CORRUPTIONS``: the 15 ImageNet-C / CIFAR-10-C / CIFAR-100-C corruptions in their published
order (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019).  The data sets ship four more "validation" corruptions (speckle_noise,
gaussian_blur, spatter, saturate) that the benchmark's mCE leaves out; so does this package.

``ALEXNET_ERR``: AlexNet's top-1 error on ImageNet-C, averaged over the 5 severities, per
corruption (fractions).  Source: github.com/hendrycks/robustness (ImageNet-C), as used verbatim by
the AugMix code (google-research/augmix ``imagenet.py``, ``ALEXNET_ERR``).  The corruption error of
a model is ``CE_c = mean_s E_{c,s} / mean_s E^AlexNet_{c,s}`` and ``mCE = mean_c CE_c``.
"""
from __future__ import annotations

from typing import Dict, Tuple

CORRUPTIONS: Tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",                    # noise
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",           # blur
    "snow", "frost", "fog", "brightness",                               # weather
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",    # digital
)

SEVERITIES: Tuple[int, ...] = (1, 2, 3, 4, 5)

ALEXNET_ERR: Dict[str, float] = dict(zip(CORRUPTIONS, (
    0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360,
    0.866816, 0.826572, 0.819324, 0.564592, 0.853204, 0.646056, 0.717840,
    0.606500,
)))
assert len(ALEXNET_ERR) == len(CORRUPTIONS)
