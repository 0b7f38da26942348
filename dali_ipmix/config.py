"""Every fact of the IPMix algorithm in one place: op tables, parameter formulas, presets.

All numbers come from the official code (hzlsaber/IPMix, ``IPMix_utils.py``, ``cifar.py``,
``imagenet.py``); where the paper differs, the code's value is the default and the paper's is an
option (see ``IPMixConfig``).  Every backend (the DALI graph, the fused torch kernel and the
NumPy/PIL reference) imports its tables from here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Tuple

# ---------------------------------------------------------------------------------------------
# Image-level operations.  The order is the official ``augmentations`` / ``augmentations_all``
# order, so an op index means the same thing in every backend and in recorded parameter tapes.
IMAGE_OPS: Tuple[str, ...] = (
    "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y",
    "translate_x", "translate_y", "mirror", "invert",
)
ALL_OPS_EXTRA: Tuple[str, ...] = ("autocontrast", "color", "contrast", "brightness", "sharpness")
ALL_IMAGE_OPS: Tuple[str, ...] = IMAGE_OPS + ALL_OPS_EXTRA

# Ops whose magnitude gets a random sign (official code: ``if np.random.uniform() > 0.5``).
SIGNED_OPS = frozenset({"rotate", "shear_x", "shear_y", "translate_x", "translate_y"})
# Ops that take no magnitude (the official code ignores the level).
PARAMLESS_OPS = frozenset({"equalize", "mirror", "invert"})
# Ops realised as one inverse affine warp (PIL AFFINE data: output -> input map).
GEOMETRIC_OPS = frozenset({"rotate", "shear_x", "shear_y", "translate_x", "translate_y", "mirror"})
# ImageEnhance blends: out = degenerate + factor * (image - degenerate).
ENHANCE_OPS = frozenset({"color", "contrast", "brightness", "sharpness"})

# P-level mixings, in the official ``mixings`` order.
MIXING_OPS: Tuple[str, ...] = ("add", "multiply", "random_pixels", "random_elems")

# Chain kinds (official ``random.choice(['IMG', 'P'])``).
KIND_IMG, KIND_P = 0, 1

# Floor used by ``multiply`` on the partner (official ``torch.clip(img2 * 2, 1e-37)``).
MULTIPLY_EPS = 1e-37


def magnitude(op: str, level: float, image_size: int) -> float:
    """The exact value the official code hands to PIL for ``op`` at level ``level`` (unsigned).

    ``level`` is ``sample_level(severity) = U[0.1, severity)``; ``int_parameter`` truncates.
    Works on Python floats and, elementwise, on NumPy arrays (used by the tape decoder).
    """
    return _MAGNITUDE[op](level, image_size)


def _int_parameter(level, maxval):
    # official: int(level * maxval / 10)  (truncation toward zero; level > 0)
    return _floor(level * maxval / 10)


def _floor(v):
    import numpy as np
    return np.floor(v) if hasattr(v, "shape") else float(int(v))


_MAGNITUDE = {
    "equalize": lambda L, S: 0.0 * L,
    "mirror": lambda L, S: 0.0 * L,
    "invert": lambda L, S: 0.0 * L,
    "posterize": lambda L, S: 4 - _int_parameter(L, 4),           # bits kept
    "rotate": lambda L, S: _int_parameter(L, 30),                 # degrees
    "solarize": lambda L, S: 256 - _int_parameter(L, 256),        # threshold
    "shear_x": lambda L, S: L * 0.3 / 10,                         # AFFINE coefficient
    "shear_y": lambda L, S: L * 0.3 / 10,
    "translate_x": lambda L, S: _int_parameter(L, S / 3),         # pixels
    "translate_y": lambda L, S: _int_parameter(L, S / 3),
    "autocontrast": lambda L, S: 10 - L,                          # cutoff percent
    "color": lambda L, S: L * 1.8 / 10 + 0.1,                     # enhance factor
    "contrast": lambda L, S: L * 1.8 / 10 + 0.1,
    "brightness": lambda L, S: L * 1.8 / 10 + 0.1,
    "sharpness": lambda L, S: L * 1.8 / 10 + 0.1,
}
assert set(_MAGNITUDE) == set(ALL_IMAGE_OPS)

# The identity magnitude of each op: an op run with it leaves the image unchanged.  Used for
# inactive tape slots and for "no-op" debugging runs.
IDENTITY_MAGNITUDE = {
    "posterize": 8.0, "rotate": 0.0, "solarize": 256.0, "shear_x": 0.0, "shear_y": 0.0,
    "translate_x": 0.0, "translate_y": 0.0, "autocontrast": 0.0, "color": 1.0,
    "contrast": 1.0, "brightness": 1.0, "sharpness": 1.0,
}

# Normalisation constants.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.5, 0.5, 0.5)
CIFAR_STD = (0.5, 0.5, 0.5)

MAX_CHAINS = 8
MAX_DEPTH = 8


@dataclass(frozen=True)
class IPMixConfig:
    """Every knob of the official code, with the ImageNet values as defaults.

    ``depth_min`` is 0 in the code (``np.random.randint(t + 1)``: a quarter of the chains are the
    identity); the paper's Algorithm 1 draws depth from ``1..t`` (``depth_min=1``).
    ``overflow='wrap'`` reproduces the code's uint8 wrap-around after add/multiply patches;
    ``'clamp'`` is PixMix's clip to [0, 1].
    """
    k: int = 3                      # chains ("mixing iterations" in the code's --k)
    t: int = 3                      # max chain depth (--t)
    beta: float = 4.0               # add/multiply strength (get_ab)
    severity: float = 1.0           # aug severity (sample_level upper bound)
    all_ops: bool = False           # --all-ops: add the 5 ImageNet-C-overlapping ops
    patch_sizes: Tuple[int, ...] = (4, 8, 16, 32, 64, 224)
    image_size: int = 224           # utils.IMAGE_SIZE: crop size, used by translate
    self_mix: bool = True           # ImageNet: partner is an augmented copy of x with p = 1/2
    square_prob: float = 0.5        # P(square patch); the rest are random rectangles ("scar")
    depth_min: int = 0              # 0 = code, 1 = paper's Algorithm 1
    overflow: str = "wrap"          # "wrap" (code) or "clamp" (PixMix)
    jsd: bool = True                # clean + two IPMix views
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        def bad(flag, why):
            raise ValueError(f"IPMix config: {flag} {why}")
        if not 1 <= self.k <= MAX_CHAINS:
            bad("k", f"must be in 1..{MAX_CHAINS}, got {self.k}")
        if not 0 <= self.t <= MAX_DEPTH:
            bad("t", f"must be in 0..{MAX_DEPTH}, got {self.t}")
        if self.depth_min not in (0, 1) or self.depth_min > max(self.t, 0):
            bad("depth_min", f"must be 0 (code) or 1 (paper) and <= t, got {self.depth_min}")
        if not self.beta > 0:
            bad("beta", f"must be > 0, got {self.beta}")
        if not 0.1 < self.severity <= 10:
            bad("severity", f"must be in (0.1, 10], got {self.severity}")
        if not self.patch_sizes:
            bad("patch_sizes", "must not be empty")
        for s in self.patch_sizes:
            if not 2 <= s <= self.image_size:
                bad("patch_sizes", f"entry {s} must be in 2..image_size ({self.image_size})")
        if self.overflow not in ("wrap", "clamp"):
            bad("overflow", f"must be 'wrap' or 'clamp', got {self.overflow!r}")
        if not 0 <= self.square_prob <= 1:
            bad("square_prob", f"must be in [0, 1], got {self.square_prob}")

    @property
    def ops(self) -> Tuple[str, ...]:
        return ALL_IMAGE_OPS if self.all_ops else IMAGE_OPS

    @property
    def n_aug(self) -> int:
        """IPMix views per source sample (each with its own tape): 2 with JSD, else 1."""
        return 2 if self.jsd else 1

    @property
    def views(self) -> int:
        """Images per source sample: clean + 2 IPMix views with JSD, else 1 IPMix view."""
        return 3 if self.jsd else 1

    def replace(self, **changes) -> "IPMixConfig":
        return dataclasses.replace(self, **changes)


# The official recipes ([CODE] imagenet.py / cifar.py defaults).
IMAGENET = IPMixConfig()
CIFAR = IPMixConfig(beta=3.0, severity=3.0, patch_sizes=(4, 8, 16, 32), image_size=32,
                    self_mix=False, mean=CIFAR_MEAN, std=CIFAR_STD)
PRESETS = {"imagenet": IMAGENET, "cifar": CIFAR}


def preset(name: str, **overrides) -> IPMixConfig:
    """A named preset (``imagenet`` or ``cifar``) with some knobs changed."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}") from None
    return base.replace(**overrides) if overrides else base


def op_index(name: str, all_ops: bool = True) -> int:
    """Index of an image op in the op table (the value stored in parameter tapes)."""
    table = ALL_IMAGE_OPS if all_ops else IMAGE_OPS
    if name not in table:
        raise ValueError(f"unknown image op {name!r}: choose one of {', '.join(table)}")
    return table.index(name)


def mixing_index(name: str) -> int:
    if name not in MIXING_OPS:
        raise ValueError(f"unknown mixing op {name!r}: choose one of {', '.join(MIXING_OPS)}")
    return MIXING_OPS.index(name)
