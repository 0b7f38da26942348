"""NumPy/PIL reference implementation of IPMix: the test oracle and the CPU baseline.

It follows the official code line by line (PIL image ops, patch windows cut by slicing, float32
mixing, ``mul(255).byte()`` quantisation) but takes its random draws from a tape
(``dali_ipmix.tape``), so that it can replay exactly what a DALI graph or the fused kernel drew.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from . import config as C
from . import noise
from .tape import CF, SF, TapeLayout


# ---------------------------------------------------------------------------------------------
# Image-level operations: ``magnitude`` is exactly what the official code hands to PIL.

def _affine(img: Image.Image, coeffs) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, tuple(coeffs), resample=Image.BILINEAR)


_PIL_OPS = {
    "equalize": lambda im, m: ImageOps.equalize(im),
    "posterize": lambda im, m: ImageOps.posterize(im, int(m)),
    "rotate": lambda im, m: im.rotate(m, resample=Image.BILINEAR),
    "solarize": lambda im, m: ImageOps.solarize(im, m),
    "shear_x": lambda im, m: _affine(im, (1, m, 0, 0, 1, 0)),
    "shear_y": lambda im, m: _affine(im, (1, 0, 0, m, 1, 0)),
    "translate_x": lambda im, m: _affine(im, (1, 0, m, 0, 1, 0)),
    "translate_y": lambda im, m: _affine(im, (1, 0, 0, 0, 1, m)),
    "mirror": lambda im, m: ImageOps.mirror(im),
    "invert": lambda im, m: ImageOps.invert(im),
    "autocontrast": lambda im, m: ImageOps.autocontrast(im, m),
    "color": lambda im, m: ImageEnhance.Color(im).enhance(m),
    "contrast": lambda im, m: ImageEnhance.Contrast(im).enhance(m),
    "brightness": lambda im, m: ImageEnhance.Brightness(im).enhance(m),
    "sharpness": lambda im, m: ImageEnhance.Sharpness(im).enhance(m),
}
C.check_implemented(_PIL_OPS, "dali_ipmix.reference._PIL_OPS")


def image_op(img: np.ndarray, name: str, magnitude=None) -> np.ndarray:
    """Apply one image op to an HWC uint8 image with PIL, as the official code does."""
    if name not in _PIL_OPS:
        raise ValueError(f"unknown image op {name!r}: choose one of {', '.join(C.ALL_IMAGE_OPS)}")
    if magnitude is None:
        magnitude = C.IDENTITY_MAGNITUDE.get(name, 0.0) if name not in C.PARAMLESS_OPS else 0.0
    # PIL ops take Python numbers; solarize/posterize/rotate/translate get ints in the code.
    m = float(magnitude)
    if name in ("posterize", "solarize", "rotate", "translate_x", "translate_y") and m == int(m):
        m = int(m)
    return np.asarray(_PIL_OPS[name](Image.fromarray(img), m))


# ---------------------------------------------------------------------------------------------
# P-level mixing.

def mixing_op(x1: np.ndarray, x2: np.ndarray, name: str, a=1.0, b=0.0, p=0.5, seed=0,
              window=None, overflow="wrap") -> np.ndarray:
    """One mixing op on uint8 HWC images, result quantised to uint8 like the official code.

    ``window = (top, left, height, width)`` restricts the op to a patch (everything outside is x1);
    ``None`` is the whole image (the pixel-level case).  ``a, b`` are used by add/multiply,
    ``p`` and ``seed`` (24-bit noise seed) by random_pixels/random_elems.
    """
    if name not in C.MIXING_OPS:
        raise ValueError(f"unknown mixing op {name!r}: choose one of {', '.join(C.MIXING_OPS)}")
    H, W = x1.shape[:2]
    top, left, h, w = (0, 0, H, W) if window is None else (int(v) for v in window)
    out = x1.copy()
    win = (slice(top, top + h), slice(left, left + w))
    p1 = x1[win].astype(np.float32) / np.float32(255)
    p2 = x2[win].astype(np.float32) / np.float32(255)
    a, b = np.float32(a), np.float32(b)
    if name == "add":
        mixed = ((a * (p1 * 2 - 1) + b * (p2 * 2 - 1)) + 1) / 2
    elif name == "multiply":
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            mixed = ((p1 * 2) ** a * np.maximum(p2 * 2, np.float32(C.MULTIPLY_EPS)) ** b) / 2
    else:
        # Masks are drawn over the whole image and cut with the window, so that a mask value
        # belongs to a pixel, not to a patch coordinate (the backends mask whole images).
        ch = 1 if name == "random_pixels" else x1.shape[2]
        u = noise.uniform_np(int(seed), H, W, ch)[win]
        mixed = np.where(u < np.float32(p), p1, p2)
    out[win] = to_uint8(mixed, overflow)
    return out


def to_uint8(x: np.ndarray, overflow: str = "wrap") -> np.ndarray:
    """The official ``ToPILImage`` on floats: ``mul(255)`` then a truncating cast that wraps
    modulo 256 on x86 (values beyond int32, inf and NaN become 0); ``clamp`` clips to [0,1] first."""
    if overflow == "clamp":
        return (np.clip(x, 0, 1) * np.float32(255)).astype(np.uint8)
    with np.errstate(over="ignore", invalid="ignore"):
        v = x * np.float32(255)
        ok = np.isfinite(v) & (np.abs(v) < 2.0 ** 31)
        return (np.trunc(np.where(ok, v, 0)).astype(np.int64) & 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The IPMix chain composition, driven by a tape.

def normalize(img: np.ndarray, cfg: C.IPMixConfig) -> np.ndarray:
    """ToTensor + Normalize: HWC uint8 -> CHW float32."""
    x = img.astype(np.float32).transpose(2, 0, 1) / np.float32(255)
    mean = np.asarray(cfg.mean, np.float32)[:, None, None]
    std = np.asarray(cfg.std, np.float32)[:, None, None]
    return (x - mean) / std


def chain_step(cur: np.ndarray, x: np.ndarray, f: np.ndarray, step: np.ndarray, cfg: C.IPMixConfig):
    """One chain step from its tape record (identity when inactive)."""
    ops = cfg.ops
    if step[SF["active_img"]]:
        return image_op(cur, ops[int(step[SF["op"]])], step[SF["mag"]])
    if step[SF["active_p"]]:
        if step[SF["self_mix"]]:
            partner = image_op(x, ops[int(step[SF["self_op"]])], step[SF["self_mag"]])
        else:
            partner = f
        window = [step[SF[n]] for n in ("top", "left", "height", "width")]
        return mixing_op(cur, partner, C.MIXING_OPS[int(step[SF["mix"]])], step[SF["a"]],
                         step[SF["b"]], step[SF["p"]], step[SF["seed"]], window, cfg.overflow)
    return cur


def chains(x: np.ndarray, f: np.ndarray, tape: np.ndarray, cfg: C.IPMixConfig):
    """The k chain results (uint8 HWC) of one tape, before mixing."""
    _, _, steps = TapeLayout(cfg.k, cfg.t).unpack(tape)
    out = []
    for i in range(cfg.k):
        cur = x
        for j in range(cfg.t):
            cur = chain_step(cur, x, f, steps[i, j], cfg)
        out.append(cur)
    return out


def ipmix_view(x: np.ndarray, f: np.ndarray, tape: np.ndarray, cfg: C.IPMixConfig) -> np.ndarray:
    """One IPMix view (normalised CHW float32) of HWC uint8 ``x`` with mixing picture ``f``."""
    skip, chain_fields, _ = TapeLayout(cfg.k, cfg.t).unpack(tape)
    mix = np.zeros((3,) + x.shape[:2], np.float32)
    for i, cur in enumerate(chains(x, f, tape, cfg)):
        mix += np.float32(chain_fields[i, CF["weight"]]) * normalize(cur, cfg)
    m = np.float32(skip)
    return (1 - m) * normalize(x, cfg) + m * mix


def ipmix_views(x: np.ndarray, f: np.ndarray, tapes, cfg: C.IPMixConfig) -> np.ndarray:
    """All views of one sample: [clean, IPMix(tape 1), IPMix(tape 2)] with JSD, else one view."""
    views = [normalize(x, cfg)] if cfg.jsd else []
    views += [ipmix_view(x, f, tp, cfg) for tp in tapes]
    return np.stack(views)
