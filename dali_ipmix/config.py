"""Every fact of the IPMix algorithm in one place: op tables, parameter formulas, presets.

All numbers come from the official code (hzlsaber/IPMix, ``IPMix_utils.py``, ``cifar.py``,
``imagenet.py``); where the paper differs, the code's value is the default and the paper's is an
option (see ``IPMixConfig``).  Every backend (the readable DALI graph, the fused backend and the
NumPy/PIL reference) imports its tables from here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

# ---------------------------------------------------------------------------------------------
# Image-level operations: one record per op, everything else is derived from the table.

@dataclass(frozen=True)
class ImageOp:
    """One image op of the official ``IPMix_utils.py`` and how its level becomes the magnitude.

    magnitude = offset + scale * param, param = level * maxval / 10 (``float_parameter``), or its
    truncation when ``truncate`` (``int_parameter``); ``maxval`` is ``image_size / size_divisor``
    when ``size_divisor`` is set (translate).  The level is ``sample_level(severity)``.
    """
    name: str
    family: str                   # "point" (a lookup table per channel), "geometric" (one inverse
    #                               affine warp, PIL's AFFINE convention), "enhance" (ImageEnhance)
    scale: float = 0.0
    maxval: float = 0.0
    offset: float = 0.0
    truncate: bool = False
    size_divisor: int = 0
    signed: bool = False          # a random sign (official: ``if np.random.uniform() > 0.5``)
    identity: Optional[float] = None   # the magnitude that changes nothing; None: no magnitude
    histogram: bool = False       # needs the image's histogram (equalize, autocontrast)
    all_ops_only: bool = False    # only with --all-ops (``augmentations_all``)

    def maxval_for(self, image_size: int) -> float:
        return image_size / self.size_divisor if self.size_divisor else self.maxval


# The official ``augmentations`` order, then the five ``augmentations_all`` adds.  An op's place
# here is fixed: a new op, default or --all-ops only, is appended at the end.  A tape's op index is
# the op's place in ``cfg.ops`` (the table in this order: all of it with --all-ops, else its
# default ops), so appending keeps every recorded tape's indices, with or without --all-ops.
# Each backend keeps, beside its code, one entry per op (or per family) and checks at import
# that it covers this table (``check_implemented``): see docs/architecture.md, "Adding an op".
OP_TABLE: Tuple[ImageOp, ...] = (
    ImageOp("equalize", "point", histogram=True),
    ImageOp("posterize", "point", scale=-1, maxval=4, offset=4, truncate=True, identity=8.0),   # bits
    ImageOp("rotate", "geometric", scale=1, maxval=30, truncate=True, signed=True, identity=0.0),  # deg
    ImageOp("solarize", "point", scale=-1, maxval=256, offset=256, truncate=True, identity=256.0),
    ImageOp("shear_x", "geometric", scale=1, maxval=0.3, signed=True, identity=0.0),   # AFFINE coeff
    ImageOp("shear_y", "geometric", scale=1, maxval=0.3, signed=True, identity=0.0),
    ImageOp("translate_x", "geometric", scale=1, size_divisor=3, truncate=True, signed=True,
            identity=0.0),                                                             # pixels
    ImageOp("translate_y", "geometric", scale=1, size_divisor=3, truncate=True, signed=True,
            identity=0.0),
    ImageOp("mirror", "geometric"),
    ImageOp("invert", "point"),
    ImageOp("autocontrast", "point", scale=-1, maxval=10, offset=10, identity=0.0, histogram=True,
            all_ops_only=True),                                                        # cutoff %
    ImageOp("color", "enhance", scale=1, maxval=1.8, offset=0.1, identity=1.0, all_ops_only=True),
    ImageOp("contrast", "enhance", scale=1, maxval=1.8, offset=0.1, identity=1.0, all_ops_only=True),
    ImageOp("brightness", "enhance", scale=1, maxval=1.8, offset=0.1, identity=1.0,
            all_ops_only=True),
    ImageOp("sharpness", "enhance", scale=1, maxval=1.8, offset=0.1, identity=1.0,
            all_ops_only=True),
)
OPS_BY_NAME = {op.name: op for op in OP_TABLE}
FAMILIES = ("point", "geometric", "enhance")


def op_lists(table: Tuple[ImageOp, ...]) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(default ops, --all-ops ops) of an op table: the names in table order, the second with
    every op, the first without the --all-ops extras."""
    return (tuple(op.name for op in table if not op.all_ops_only), tuple(op.name for op in table))


IMAGE_OPS, ALL_IMAGE_OPS = op_lists(OP_TABLE)


def check_implemented(implemented, where: str, family: Optional[str] = None) -> None:
    """Raise unless ``implemented`` (names) are exactly the ops of the table -- of ``family`` when
    given: what a backend calls at import, so that an op without code (or code for an op that is
    not in the table, or of another family) is an error, never a silent fall-through."""
    want = {op.name for op in OP_TABLE if family is None or op.family == family}
    missing = [n for n in ALL_IMAGE_OPS if n in want and n not in implemented]
    extra = sorted(set(implemented) - want)
    kind = f"{family} " if family else ""
    if missing:
        rec = OPS_BY_NAME[missing[0]]
        raise NotImplementedError(f"image op {rec.name!r} ({rec.family}) has no implementation in "
                                  f"{where}: add one (docs/architecture.md, 'Adding an op')")
    if extra:
        rec = OPS_BY_NAME.get(extra[0])
        said = f"a {rec.family} op" if rec else "no op"
        raise NotImplementedError(f"{where} has {kind}code for {extra[0]!r}, and config.OP_TABLE "
                                  f"says it is {said}")


def _ops_where(test) -> frozenset:
    return frozenset(op.name for op in OP_TABLE if test(op))


SIGNED_OPS = _ops_where(lambda op: op.signed)
PARAMLESS_OPS = _ops_where(lambda op: op.identity is None)
if any(op.family not in FAMILIES for op in OP_TABLE):
    raise ValueError(f"config.OP_TABLE: an op's family must be one of {', '.join(FAMILIES)}")
POINT_OPS = _ops_where(lambda op: op.family == "point")
GEOMETRIC_OPS = _ops_where(lambda op: op.family == "geometric")
ENHANCE_OPS = _ops_where(lambda op: op.family == "enhance")
HISTOGRAM_OPS = _ops_where(lambda op: op.histogram)
# The magnitude of each op that leaves the image unchanged (inactive slots, "no-op" debugging).
IDENTITY_MAGNITUDE = {op.name: op.identity for op in OP_TABLE if op.identity is not None}

# P-level mixings, in the official ``mixings`` order.
MIXING_OPS: Tuple[str, ...] = ("add", "multiply", "random_pixels", "random_elems")

# Chain kinds (official ``random.choice(['IMG', 'P'])``).
KIND_IMG, KIND_P = 0, 1

# Floor used by ``multiply`` on the partner (official ``torch.clip(img2 * 2, 1e-37)``).
MULTIPLY_EPS = 1e-37


def magnitude(op: str, level, image_size: int):
    """The exact value the official code hands to PIL for ``op`` at level ``level`` (unsigned):
    ``offset + scale * (int|float)_parameter(level, maxval)``.  Works on Python floats (in double,
    as the official code) and elementwise on NumPy arrays."""
    import numpy as np
    rec = OPS_BY_NAME[op]
    param = level * rec.maxval_for(image_size) / 10
    if rec.truncate:                  # int(): truncation toward zero (levels are positive)
        param = np.floor(param) if hasattr(param, "shape") else float(int(param))
    return rec.offset + rec.scale * param


# Normalisation constants.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.5, 0.5, 0.5)
CIFAR_STD = (0.5, 0.5, 0.5)

MAX_CHAINS = 8
MAX_DEPTH = 8
# crop sizes (px): the smallest patch is 4 px; 4096 px already means 48 MiB per view, and a crop of
# 100000 px would ask every view for 28 GiB
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 4096


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
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            bad("image_size", f"must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}, got {self.image_size}")
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
    """Index of an image op in ``cfg.ops`` (the value stored in parameter tapes); with
    ``all_ops`` also its place in ``OP_TABLE``."""
    table = ALL_IMAGE_OPS if all_ops else IMAGE_OPS
    if name not in table:
        raise ValueError(f"unknown image op {name!r}: choose one of {', '.join(table)}")
    return table.index(name)


def mixing_index(name: str) -> int:
    if name not in MIXING_OPS:
        raise ValueError(f"unknown mixing op {name!r}: choose one of {', '.join(MIXING_OPS)}")
    return MIXING_OPS.index(name)
