"""The 15 ImageNet-C corruptions generated on the fly, for validation sets without an ImageNet-C copy.

The corruption functions come from ``imagecorruptions-imaug`` (PyPI), the maintained fork of
bethgelab's ``imagecorruptions``: Hendrycks & Dietterich's ImageNet-C code (``make_imagenet_c.py``)
made size-agnostic and free of ImageMagick (motion blur and snow use a NumPy sum of shifted
copies in place of Wand's motion blur), shipped with the original frost pictures.  The original
``imagecorruptions`` 1.1.2 does not run with scikit-image >= 0.19 (``gaussian(multichannel=...)``)
nor without ``pkg_resources``.

ImageNet-C protocol: the corruption is applied to the uint8 crop after Resize(256) +
CenterCrop(224), before normalisation.  ImageNet-C then stored each image as a JPEG; generated
corruptions skip that round trip, so their errors are close to, not equal to, the published
data set's.  The functions use ImageNet-C's constants at any image size (CIFAR-10-C has its own,
milder table: use a CIFAR-C folder for CIFAR numbers).  Images must be at least 32 px a side.

Every call is seeded: ``corrupt(image, name, severity, seed)`` is a pure function of its arguments.
"""
from __future__ import annotations

import functools

import numpy as np

from ..errors import UserError
from .tables import CORRUPTIONS, SEVERITIES

PACKAGE = "imagecorruptions-imaug==1.1.5"
MIN_SIDE = 32                     # the package refuses smaller images
_SEEDED_BY_ARGUMENT = frozenset({"glass_blur", "impulse_noise"})   # these ignore np.random.seed


@functools.lru_cache(maxsize=1)
def _package():
    try:
        import imagecorruptions
    except ImportError as e:
        raise UserError(f"generated corruptions need the package {PACKAGE} "
                        f"(pip install {PACKAGE}); or give an ImageNet-C / CIFAR-C folder, or "
                        f"--no-corruptions ({e})") from None
    return imagecorruptions


def check_available() -> None:
    """Raise UserError (with the install command) when the corruption package is missing."""
    _package()


def sample_seed(seed: int, name: str, severity: int, index: int) -> int:
    """The seed of one corrupted sample: independent streams per (seed, corruption, severity, index)."""
    return int(np.random.SeedSequence([seed, CORRUPTIONS.index(name), severity, index]).generate_state(1)[0])


def corrupt(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """``image`` (uint8 HxWx3, H and W >= 32) with corruption ``name`` at ``severity`` (1..5).

    The package draws from NumPy's global generator; it is seeded with ``seed`` for this call and
    restored afterwards, so callers' random streams are untouched.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"corrupt expects uint8 HxWx3, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"generated corruptions need images of at least {MIN_SIDE} px, got {image.shape[:2]}")
    package = _package()
    extra = {"seed": seed} if name in _SEEDED_BY_ARGUMENT else {}
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        out = package.corrupt(np.ascontiguousarray(image), severity=severity, corruption_name=name, **extra)
    finally:
        np.random.set_state(state)
    # a copy: pixelate and jpeg_compression hand back a read-only view of a PIL image, which the
    # DataLoader's collate turns into a tensor with a warning from every worker
    return np.array(out, dtype=np.uint8).reshape(image.shape)


def warm_up(names) -> None:
    """Compile the package's numba kernel (glass blur, ~7 s) once in this process, so that forked
    data-loader workers inherit it instead of each compiling it again."""
    if "glass_blur" in names:
        corrupt(np.zeros((MIN_SIDE, MIN_SIDE, 3), np.uint8), "glass_blur", 1, seed=0)
