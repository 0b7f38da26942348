"""IPMix's pixel work as a handful of Triton kernels (``fused.ipmix_views(..., impl="triton")``).

A batch of B images with A IPMix views each (2 with JSD) and k chains of t steps is computed for
all B * A * k chains at once:

* ``_decode_kernel`` (1 launch): raw uniforms -> parameter tapes, by the rules of ``tape.decode``
  (tests/test_triton.py checks it against the NumPy decoder).
* for each chain-step level j = 0 .. t-1 (2 launches each):
  ``_tables_kernel`` -- the per-image tables that point ops need: histogram + LUT for equalize and
  autocontrast, the mean grey for contrast; programs whose step needs none return at once;
  ``_step_kernel`` -- the step itself, from the previous chain buffer into the next: the image op,
  or the patch mixing with its partner (the fractal, or the self-mix op applied to the original on
  the fly); tiles outside the patch window only copy.
* ``_finish_kernel`` (1 launch): the Dirichlet/Beta weighted sum, the normalisation, the layout
  (CHW or HWC) and the output dtype.

That is 2t + 2 kernel launches per batch, whatever B and k (9 launches with the ``torch.zeros``
of the per-image means, for t = 3).  Each program reads its own sample's tape
record, so there is no host synchronisation and no per-sample Python.

Exactness.  The arithmetic follows ``reference`` (PIL, NumPy) operation by operation: double
precision for the affine warp and autocontrast as PIL computes them, float32 for the mixings and the
final mix, ``x / 255`` from an exact table, correctly rounded divisions (``div_rn``: Triton's
float32 ``/`` is approximate on CUDA), truncation where PIL truncates; kernels are compiled without
FMA contraction (``enable_fp_fusion=False``).  Under ``TRITON_INTERPRET=1`` (the CPU
tests) the results are bit-identical to the reference; ``pow`` has no libdevice there, so NumPy's
float32 ``power`` -- the function the reference uses -- stands in.  On CUDA, libdevice's ``powf``
and ``logf`` may differ from glibc's in the last bit, which can move a rare pixel of a multiply
patch or a mixing weight by one ulp.  Rotation angles must be whole degrees (what tapes hold): the
matrices are PIL's own, tabulated on the host.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
import triton
import triton.language as tl

from . import config as C
from . import noise
from . import tape as T
from .exact_tables import image_tables

# ---------------------------------------------------------------------------------------------
# Constants shared with the rest of the package (op indices, tape offsets), as Triton constexprs.
# The ops ``_image_op`` has a branch for, each known by its place in ``config.OP_TABLE``; a tape's
# op index (a place in ``cfg.ops``) is mapped onto that place by ``_table_op``.

STEP_KERNEL_OPS = ("equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y",
                   "translate_x", "translate_y", "mirror", "invert", "autocontrast", "color",
                   "contrast", "brightness", "sharpness")
C.check_implemented(STEP_KERNEL_OPS, "dali_ipmix.triton_kernels (STEP_KERNEL_OPS and a branch "
                                     "of _image_op)")
OP_EQUALIZE = tl.constexpr(C.op_index("equalize"))
OP_POSTERIZE = tl.constexpr(C.op_index("posterize"))
OP_ROTATE = tl.constexpr(C.op_index("rotate"))
OP_SOLARIZE = tl.constexpr(C.op_index("solarize"))
OP_SHEAR_X = tl.constexpr(C.op_index("shear_x"))
OP_SHEAR_Y = tl.constexpr(C.op_index("shear_y"))
OP_TRANSLATE_X = tl.constexpr(C.op_index("translate_x"))
OP_TRANSLATE_Y = tl.constexpr(C.op_index("translate_y"))
OP_MIRROR = tl.constexpr(C.op_index("mirror"))
OP_INVERT = tl.constexpr(C.op_index("invert"))
OP_AUTOCONTRAST = tl.constexpr(C.op_index("autocontrast"))
OP_COLOR = tl.constexpr(C.op_index("color"))
OP_CONTRAST = tl.constexpr(C.op_index("contrast"))
OP_BRIGHTNESS = tl.constexpr(C.op_index("brightness"))
OP_SHARPNESS = tl.constexpr(C.op_index("sharpness"))

MIX_ADD = tl.constexpr(C.MIXING_OPS.index("add"))
MIX_MULTIPLY = tl.constexpr(C.MIXING_OPS.index("multiply"))
MIX_RANDOM_ELEMS = tl.constexpr(C.MIXING_OPS.index("random_elems"))

NSF = tl.constexpr(len(T.STEP_FIELDS))
NCF = tl.constexpr(len(T.CHAIN_FIELDS))
NSD = tl.constexpr(len(T.STEP_DRAWS))
NCD = tl.constexpr(len(T.CHAIN_DRAWS))
F_ACTIVE_IMG = tl.constexpr(T.SF["active_img"])
F_ACTIVE_P = tl.constexpr(T.SF["active_p"])
F_OP = tl.constexpr(T.SF["op"])
F_MAG = tl.constexpr(T.SF["mag"])
F_MIX = tl.constexpr(T.SF["mix"])
F_SELF_MIX = tl.constexpr(T.SF["self_mix"])
F_SELF_OP = tl.constexpr(T.SF["self_op"])
F_SELF_MAG = tl.constexpr(T.SF["self_mag"])
F_TOP = tl.constexpr(T.SF["top"])
F_LEFT = tl.constexpr(T.SF["left"])
F_HEIGHT = tl.constexpr(T.SF["height"])
F_WIDTH = tl.constexpr(T.SF["width"])
F_A = tl.constexpr(T.SF["a"])
F_B = tl.constexpr(T.SF["b"])
F_P = tl.constexpr(T.SF["p"])
F_SEED = tl.constexpr(T.SF["seed"])
CF_WEIGHT = tl.constexpr(T.CF["weight"])
CF_KIND = tl.constexpr(T.CF["kind"])
CF_DEPTH = tl.constexpr(T.CF["depth"])
D_WEIGHT = tl.constexpr(T.CD["weight"])
D_KIND = tl.constexpr(T.CD["kind"])
D_DEPTH = tl.constexpr(T.CD["depth"])
D_IMG_OP = tl.constexpr(T.SD["img_op"])
D_IMG_LEVEL = tl.constexpr(T.SD["img_level"])
D_IMG_SIGN = tl.constexpr(T.SD["img_sign"])
D_SIZE = tl.constexpr(T.SD["size"])
D_MIX = tl.constexpr(T.SD["mix"])
D_PARTNER = tl.constexpr(T.SD["partner"])
D_SELF_OP = tl.constexpr(T.SD["self_op"])
D_SELF_LEVEL = tl.constexpr(T.SD["self_level"])
D_SELF_SIGN = tl.constexpr(T.SD["self_sign"])
D_TOP = tl.constexpr(T.SD["top"])
D_LEFT = tl.constexpr(T.SD["left"])
D_SQUARE = tl.constexpr(T.SD["square"])
D_HEIGHT = tl.constexpr(T.SD["height"])
D_WIDTH = tl.constexpr(T.SD["width"])
D_AB_BRANCH = tl.constexpr(T.SD["ab_branch"])
D_A = tl.constexpr(T.SD["a"])
D_B = tl.constexpr(T.SD["b"])
D_P = tl.constexpr(T.SD["p"])
D_SEED = tl.constexpr(T.SD["seed"])

HASH_MUL = tl.constexpr(noise.MUL)
SEED_RANGE = tl.constexpr(T.SEED_RANGE)

# Pillow's grey (``RGB -> L``) weights and its SMOOTH filter kernel (divided in float32).
_SMOOTH_SIDE = tl.constexpr(float(np.float32(1) / np.float32(13)))
_SMOOTH_CENTRE = tl.constexpr(float(np.float32(5) / np.float32(13)))

# Launch shapes.  The step kernel holds every op's code path: with 512 pixels (x 4 lanes) and 4
# warps a program needs 255 registers and spills; 256 pixels over 8 warps need 78 (ptxas, sm_90).
BLOCK_PIXELS = 256          # pixels per program of the step and finish kernels
STEP_WARPS = 8
BLOCK_SCAN = 1024           # pixels per iteration of the table kernel's histogram loop


def _interpreted(fn) -> bool:
    return not isinstance(fn, triton.runtime.JITFunction)


# ``pow``: libdevice's powf when compiled; the Triton interpreter has no libdevice, so NumPy's
# float32 power (what the reference computes) stands in there.
@triton.jit
def _probe():
    pass


INTERPRETED = _interpreted(_probe)

if INTERPRETED:
    def _powf(x, y):
        from triton.runtime.interpreter import TensorHandle
        yd = y.handle.data if hasattr(y, "handle") else np.float32(y)
        with np.errstate(all="ignore"):
            d = np.power(x.handle.data, yd, dtype=np.float32)
        return tl.core.tensor(TensorHandle(d, tl.float32), x.type)
else:
    try:
        from triton.language.extra import libdevice
    except ImportError:  # pragma: no cover - Triton < 3.2
        from triton.language.extra.cuda import libdevice

    @triton.jit
    def _powf(x, y):
        return libdevice.pow(x, y)


# ---------------------------------------------------------------------------------------------
# Decode: raw uniforms -> tapes (tape.decode, one program per view of a sample).

@triton.jit
def _randint(u, lo: tl.constexpr, hi: tl.constexpr):
    n = hi - lo + 1
    return tl.minimum(tl.floor(u * n), n - 1) + lo


@triton.jit
def _magnitude(op, u_level, u_sign, tab_a, tab_m, tab_b, tab_f, tab_sign, sev_span, mask):
    # tape._magnitude: mag = B + A * maybe_floor(level * M / 10), sign flipped on u_sign > 0.5
    opi = op.to(tl.int32)
    level = u_level * sev_span + 0.1
    raw = tl.math.div_rn(level * tl.load(tab_m + opi, mask=mask, other=0.0), 10.0)
    floored = tl.load(tab_f + opi, mask=mask, other=0.0)
    v = floored * tl.floor(raw) + (1 - floored) * raw
    mag = tl.load(tab_b + opi, mask=mask, other=0.0) + tl.load(tab_a + opi, mask=mask, other=0.0) * v
    flip = (u_sign > 0.5).to(tl.float32) * tl.load(tab_sign + opi, mask=mask, other=0.0)
    return mag * (1 - 2 * flip)


@triton.jit
def _expo(uc, i: tl.constexpr):
    return -tl.log(1 - tl.load(uc + i * NCD + D_WEIGHT))


@triton.jit
def _decode_kernel(u_ptr, rec_ptr, tab_a, tab_m, tab_b, tab_f, tab_sign, sizes_ptr,
                   sev_span, inv_beta, square_prob, self_mix_on,
                   K: tl.constexpr, T: tl.constexpr, U: tl.constexpr, L: tl.constexpr,
                   NOPS: tl.constexpr, NSIZES: tl.constexpr, DEPTH_MIN: tl.constexpr,
                   S: tl.constexpr, KT_PAD: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    u = u_ptr + n * U
    r = rec_ptr + n * L
    uc = u + 1
    tl.store(r, tl.load(u))                                      # skip weight m ~ Beta(1, 1)
    # Dirichlet(1, ..., 1): normalised Exp(1) draws, summed in NumPy's order (its pairwise sum
    # adds fewer than 8 values in sequence, and 8 as a balanced tree)
    if K == 8:
        total = ((_expo(uc, 0) + _expo(uc, 1)) + (_expo(uc, 2) + _expo(uc, 3))) + \
            ((_expo(uc, 4) + _expo(uc, 5)) + (_expo(uc, 6) + _expo(uc, 7)))
    else:
        total = _expo(uc, 0)
        for i in tl.static_range(1, K):
            total += _expo(uc, i)
    for i in tl.static_range(K):
        expo = _expo(uc, i)
        kind = (tl.load(uc + i * NCD + D_KIND) >= 0.5).to(tl.float32)
        depth = _randint(tl.load(uc + i * NCD + D_DEPTH), DEPTH_MIN, T)
        tl.store(r + 1 + i * NCF + CF_WEIGHT, tl.math.div_rn(expo, total))
        tl.store(r + 1 + i * NCF + CF_KIND, kind)
        tl.store(r + 1 + i * NCF + CF_DEPTH, depth)
    if T > 0:
        s = tl.arange(0, KT_PAD)
        sm = s < K * T
        i = s // T
        j = s % T
        us = u + 1 + K * NCD + s * NSD
        rs = r + 1 + K * NCF + s * NSF
        kind = (tl.load(uc + i * NCD + D_KIND, mask=sm, other=0.0) >= 0.5).to(tl.float32)
        depth = _randint(tl.load(uc + i * NCD + D_DEPTH, mask=sm, other=0.0), DEPTH_MIN, T)
        active = (j.to(tl.float32) < depth).to(tl.float32)
        active_p = active * kind
        active_img = active - active_p

        op = _randint(tl.load(us + D_IMG_OP, mask=sm, other=0.0), 0, NOPS - 1)
        mag = _magnitude(op, tl.load(us + D_IMG_LEVEL, mask=sm, other=0.0),
                         tl.load(us + D_IMG_SIGN, mask=sm, other=0.0),
                         tab_a, tab_m, tab_b, tab_f, tab_sign, sev_span, sm)
        size_i = _randint(tl.load(us + D_SIZE, mask=sm, other=0.0), 0, NSIZES - 1)
        size = tl.load(sizes_ptr + size_i.to(tl.int32), mask=sm, other=0.0)
        mix = _randint(tl.load(us + D_MIX, mask=sm, other=0.0), 0, 3)
        self_mix = (tl.load(us + D_PARTNER, mask=sm, other=0.0) <= 0.5).to(tl.float32) * self_mix_on
        self_op = _randint(tl.load(us + D_SELF_OP, mask=sm, other=0.0), 0, NOPS - 1)
        self_mag = _magnitude(self_op, tl.load(us + D_SELF_LEVEL, mask=sm, other=0.0),
                              tl.load(us + D_SELF_SIGN, mask=sm, other=0.0),
                              tab_a, tab_m, tab_b, tab_f, tab_sign, sev_span, sm)
        top = tl.floor(tl.load(us + D_TOP, mask=sm, other=0.0) * (S - size + 1))
        left = tl.floor(tl.load(us + D_LEFT, mask=sm, other=0.0) * (S - size + 1))
        square = (tl.load(us + D_SQUARE, mask=sm, other=0.0) < square_prob).to(tl.float32)
        rect_h = tl.floor(tl.load(us + D_HEIGHT, mask=sm, other=0.0) * (size - 1)) + 2
        rect_w = tl.floor(tl.load(us + D_WIDTH, mask=sm, other=0.0) * (size - 1)) + 2
        height = square * size + (1 - square) * rect_h
        width = square * size + (1 - square) * rect_w
        beta_b1 = _powf(tl.load(us + D_A, mask=sm, other=0.0), inv_beta)
        beta_1b_a = 1 - beta_b1
        beta_1b_b = 1 - _powf(tl.load(us + D_B, mask=sm, other=0.0), inv_beta)
        interp = (tl.load(us + D_AB_BRANCH, mask=sm, other=0.0) < 0.5).to(tl.float32)
        a = interp * beta_b1 + (1 - interp) * (1 + beta_1b_a)
        b = interp * beta_1b_b - (1 - interp) * beta_1b_b
        seed = tl.floor(tl.load(us + D_SEED, mask=sm, other=0.0) * SEED_RANGE)

        tl.store(rs + F_ACTIVE_IMG, active_img, mask=sm)
        tl.store(rs + F_ACTIVE_P, active_p, mask=sm)
        tl.store(rs + F_OP, op, mask=sm)
        tl.store(rs + F_MAG, mag, mask=sm)
        tl.store(rs + F_MIX, mix, mask=sm)
        tl.store(rs + F_SELF_MIX, self_mix, mask=sm)
        tl.store(rs + F_SELF_OP, self_op, mask=sm)
        tl.store(rs + F_SELF_MAG, self_mag, mask=sm)
        tl.store(rs + F_TOP, top, mask=sm)
        tl.store(rs + F_LEFT, left, mask=sm)
        tl.store(rs + F_HEIGHT, height, mask=sm)
        tl.store(rs + F_WIDTH, width, mask=sm)
        tl.store(rs + F_A, a, mask=sm)
        tl.store(rs + F_B, b, mask=sm)
        tl.store(rs + F_P, tl.load(us + D_P, mask=sm, other=0.0), mask=sm)
        tl.store(rs + F_SEED, seed, mask=sm)


# ---------------------------------------------------------------------------------------------
# Per-image tables for the step: histograms -> equalize / autocontrast LUTs, contrast's mean.

@triton.jit
def _table_op(st, act_img, ops_map, NOPS: tl.constexpr):
    """The op of a step record (its image op, else its self-mix op) as its place in
    ``config.OP_TABLE``, through ``ops_map`` (``cfg.ops`` -> table); -1 (unchanged) for an index
    outside ``cfg.ops``."""
    op = tl.where(act_img, tl.load(st + F_OP), tl.load(st + F_SELF_OP)).to(tl.int32)
    known = (op >= 0) & (op < NOPS)
    return tl.where(known, tl.load(ops_map + tl.where(known, op, 0)), -1)


@triton.jit
def _step_record(rec_ptr, q, j, A: tl.constexpr, K: tl.constexpr, T: tl.constexpr,
                 L: tl.constexpr):
    """Step j of chain image q (sample-major, then view, then chain): a pointer to its tape
    fields, its sample b, and whether it is an image op, a patch mixing, a self-mixing."""
    n = q // K
    st = rec_ptr + n * L + 1 + K * NCF + ((q % K) * T + j) * NSF
    act_img = tl.load(st + F_ACTIVE_IMG) > 0
    act_p = (tl.load(st + F_ACTIVE_P) > 0) & (tl.load(st + F_ACTIVE_IMG) <= 0)
    self_mix = act_p & (tl.load(st + F_SELF_MIX) > 0)
    return st, n // A, act_img, act_p, self_mix


@triton.jit
def _step_source(x_ptr, src_ptr, q, b, act_img, HW3, FIRST: tl.constexpr):
    """The image this step's image op reads: the chain's current image (x itself at step 0) for
    an IMG step, the original x for a self-mix partner."""
    x_img = x_ptr + b * HW3
    if FIRST:
        cur = x_img
    else:
        cur = src_ptr + q * HW3
    if act_img:
        img = cur
    else:
        img = x_img
    return cur, img


@triton.jit
def _tables_kernel(x_ptr, rec_ptr, src_ptr, lut_ptr, mean_ptr, scale_ptr, ops_map, j,
                   A: tl.constexpr, K: tl.constexpr, T: tl.constexpr, L: tl.constexpr,
                   H: tl.constexpr, W: tl.constexpr, NOPS: tl.constexpr, FIRST: tl.constexpr,
                   BLOCK: tl.constexpr):
    q = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    HW = H * W
    HW3 = HW * 3
    st, b, act_img, act_p, self_mix = _step_record(rec_ptr, q, j, A, K, T, L)
    op = _table_op(st, act_img, ops_map, NOPS)
    mag = tl.where(act_img, tl.load(st + F_MAG), tl.load(st + F_SELF_MAG))
    runs = act_img | self_mix
    cur, img = _step_source(x_ptr, src_ptr, q, b, act_img, HW3, FIRST)
    if runs & ((op == OP_EQUALIZE) | (op == OP_AUTOCONTRAST)):
        hist = tl.zeros([256], dtype=tl.int32)
        for start in range(0, HW, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(img + offs * 3 + c, mask=offs < HW, other=0).to(tl.int32)
            hist += tl.histogram(v, 256)
        # the masked lanes of the last block were counted in bin 0
        pad = (HW + BLOCK - 1) // BLOCK * BLOCK - HW
        idx = tl.arange(0, 256)
        hist -= tl.where(idx == 0, pad, 0)
        if op == OP_EQUALIZE:
            lut = _equalize_lut(hist, idx)
        else:
            lut = _autocontrast_lut(hist, idx, mag, scale_ptr)
        tl.store(lut_ptr + (q * 3 + c) * 256 + idx, lut)
    if runs & (op == OP_CONTRAST) & (c == 0):
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, HW, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            pm = offs < HW
            acc += tl.where(pm, _grey(img, offs * 3, pm), 0)
        s = tl.sum(acc, axis=0)
        # ImageEnhance.Contrast: int(mean(L) + 0.5), in integers
        tl.store(mean_ptr + q, (2 * s + HW) // (2 * HW))


@triton.jit
def _grey(img, e0, mask):
    """Pillow's RGB -> L of the pixels whose red channel is at element offset e0."""
    r = tl.load(img + e0, mask=mask, other=0).to(tl.int32)
    g = tl.load(img + e0 + 1, mask=mask, other=0).to(tl.int32)
    bl = tl.load(img + e0 + 2, mask=mask, other=0).to(tl.int32)
    return (r * 19595 + g * 38470 + bl * 7471 + 0x8000) >> 16


@triton.jit
def _equalize_lut(hist, idx):
    """PIL ImageOps.equalize for one channel's histogram."""
    nz = hist > 0
    nnz = tl.sum(nz.to(tl.int32), axis=0)
    last = tl.max(tl.where(nz, idx, -1), axis=0)
    h_last = tl.sum(tl.where(idx == last, hist, 0), axis=0)
    step = (tl.sum(hist, axis=0) - h_last) // 255
    cum_excl = tl.cumsum(hist, 0) - hist
    lut = (step // 2 + cum_excl) // tl.maximum(step, 1)
    keep = (nnz <= 1) | (step == 0)
    return tl.minimum(tl.where(keep, idx, lut), 255)


@triton.jit
def _autocontrast_lut(hist, idx, cutoff, scale_ptr):
    """PIL ImageOps.autocontrast(img, cutoff) for one channel (same cutoff at both ends)."""
    n = tl.sum(hist, axis=0)
    v = n.to(tl.float64) * cutoff.to(tl.float64)
    # cut = int(n * cutoff // 100): the exact floor of the quotient
    qf = tl.floor(v / 100.0)
    qf = tl.where(qf * 100.0 > v, qf - 1, qf)
    qf = tl.where((qf + 1) * 100.0 <= v, qf + 1, qf)
    cut = qf.to(tl.int32)
    cum_incl = tl.cumsum(hist, 0)
    suffix_incl = n - cum_incl + hist
    lo = tl.sum((cum_incl <= cut).to(tl.int32), axis=0)
    hi = 255 - tl.sum((suffix_incl <= cut).to(tl.int32), axis=0)
    scale = tl.load(scale_ptr + tl.minimum(tl.maximum(hi - lo, 1), 255))   # 255.0 / (hi - lo)
    offset = (-lo).to(tl.float64) * scale
    lut = tl.minimum(tl.maximum((idx.to(tl.float64) * scale + offset).to(tl.int32), 0), 255)
    return tl.where(hi <= lo, idx, lut)


# ---------------------------------------------------------------------------------------------
# One chain step.

@triton.jit
def _warp(img, op, mag, rot_ptr, rows, cols, ch, mask, H: tl.constexpr, W: tl.constexpr):
    """PIL transform(AFFINE, matrix, BILINEAR) with fill 0 (Geometry.c), for the geometric ops."""
    m64 = mag.to(tl.float64)
    is_rot = op == OP_ROTATE
    ang = (mag.to(tl.int32) % 360 + 360) % 360
    rb = rot_ptr + ang * 6
    a0 = tl.where(is_rot, tl.load(rb + 0), tl.where(op == OP_MIRROR, -1.0, 1.0).to(tl.float64))
    a1 = tl.where(is_rot, tl.load(rb + 1), tl.where(op == OP_SHEAR_X, m64, 0.0))
    a2 = tl.where(is_rot, tl.load(rb + 2),
                  tl.where(op == OP_TRANSLATE_X, m64,
                           tl.where(op == OP_MIRROR, W * 1.0, 0.0).to(tl.float64)))
    a3 = tl.where(is_rot, tl.load(rb + 3), tl.where(op == OP_SHEAR_Y, m64, 0.0))
    a4 = tl.where(is_rot, tl.load(rb + 4), 1.0)
    a5 = tl.where(is_rot, tl.load(rb + 5), tl.where(op == OP_TRANSLATE_Y, m64, 0.0))
    xc = cols.to(tl.float64) + 0.5
    yc = rows.to(tl.float64) + 0.5
    xin = a0 * xc + a1 * yc + a2
    yin = a3 * xc + a4 * yc + a5
    inside = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
    xf = xin - 0.5
    yf = yin - 0.5
    x0 = tl.floor(xf)
    y0 = tl.floor(yf)
    dx = xf - x0
    dy = yf - y0
    # clamp in float first: far-away coordinates may not fit an int
    x0c = tl.minimum(tl.maximum(x0, 0.0), W - 1.0).to(tl.int32)
    x1c = tl.minimum(tl.maximum(x0 + 1, 0.0), W - 1.0).to(tl.int32)
    y0c = tl.minimum(tl.maximum(y0, 0.0), H - 1.0).to(tl.int32)
    y1c = tl.minimum(tl.maximum(y0 + 1, 0.0), H - 1.0).to(tl.int32)
    m = mask & inside
    p00 = tl.load(img + (y0c * W + x0c) * 3 + ch, mask=m, other=0).to(tl.float64)
    p01 = tl.load(img + (y0c * W + x1c) * 3 + ch, mask=m, other=0).to(tl.float64)
    p10 = tl.load(img + (y1c * W + x0c) * 3 + ch, mask=m, other=0).to(tl.float64)
    p11 = tl.load(img + (y1c * W + x1c) * 3 + ch, mask=m, other=0).to(tl.float64)
    v1 = p00 + (p01 - p00) * dx
    v2 = p10 + (p11 - p10) * dx
    v = v1 + (v2 - v1) * dy
    return tl.where(inside, v.to(tl.int32), 0)           # v >= 0: the cast truncates like PIL


@triton.jit
def _smooth(img, v, rows, cols, ch, mask, H: tl.constexpr, W: tl.constexpr):
    """Pillow's ImageFilter.SMOOTH (Filter.c: float32, + 0.5, truncated, border copied)."""
    inner = (rows > 0) & (rows < H - 1) & (cols > 0) & (cols < W - 1)
    m = mask & inner
    e = (rows * W + cols) * 3 + ch
    ss = _smooth_row(img, e + 3 * W, m, _SMOOTH_SIDE, _SMOOTH_SIDE) + 0.5
    ss = ss + _smooth_row(img, e, m, _SMOOTH_SIDE, _SMOOTH_CENTRE)
    ss = ss + _smooth_row(img, e - 3 * W, m, _SMOOTH_SIDE, _SMOOTH_SIDE)
    sm = tl.minimum(tl.maximum(ss.to(tl.int32), 0), 255)
    return tl.where(inner, sm, v).to(tl.float32)


@triton.jit
def _smooth_row(img, e, m, k_side, k_mid):
    left = tl.load(img + e - 3, mask=m, other=0).to(tl.float32)
    mid = tl.load(img + e, mask=m, other=0).to(tl.float32)
    right = tl.load(img + e + 3, mask=m, other=0).to(tl.float32)
    return (left * k_side + mid * k_mid) + right * k_side


@triton.jit
def _image_op(img, op, mag, lut, mean, rot_ptr, pix, rows, cols, ch, mask,
              H: tl.constexpr, W: tl.constexpr):
    """One image op of the op table on a tile [BLOCK_PIXELS, 4] of ``img``; values as int32."""
    e = pix * 3 + ch
    v = tl.load(img + e, mask=mask, other=0).to(tl.int32)
    if (op == OP_ROTATE) | (op == OP_SHEAR_X) | (op == OP_SHEAR_Y) | (op == OP_TRANSLATE_X) \
            | (op == OP_TRANSLATE_Y) | (op == OP_MIRROR):
        res = _warp(img, op, mag, rot_ptr, rows, cols, ch, mask, H, W)
    elif (op == OP_EQUALIZE) | (op == OP_AUTOCONTRAST):
        res = tl.load(lut + ch * 256 + v, mask=mask, other=0)
    elif op == OP_POSTERIZE:
        # ImageOps.posterize(img, int(bits)): v & ~(2 ** (8 - bits) - 1)
        shift = tl.minimum(tl.maximum(8 - mag.to(tl.int32), 0), 8)
        res = (v >> shift) << shift
    elif op == OP_SOLARIZE:
        res = tl.where(v.to(tl.float32) < mag, v, 255 - v)
    elif op == OP_INVERT:
        res = 255 - v
    elif (op == OP_COLOR) | (op == OP_CONTRAST) | (op == OP_BRIGHTNESS) | (op == OP_SHARPNESS):
        # ImageEnhance: Image.blend(degenerate, img, factor), float32, truncated and clipped
        xf = v.to(tl.float32)
        if op == OP_COLOR:
            grey = _grey(img, pix * 3, mask)
            deg = tl.broadcast_to(grey, v.shape).to(tl.float32)
        elif op == OP_CONTRAST:
            deg = xf * 0.0 + mean.to(tl.float32)
        elif op == OP_SHARPNESS:
            deg = _smooth(img, v, rows, cols, ch, mask, H, W)
        else:
            deg = xf * 0.0
        blended = deg + mag * (xf - deg)
        res = tl.minimum(tl.maximum(blended.to(tl.int32), 0), 255)
    else:
        res = v
    return res


@triton.jit
def _hash32(x):
    x = ((x >> 16) ^ x) * HASH_MUL
    x = ((x >> 16) ^ x) * HASH_MUL
    return (x >> 16) ^ x


@triton.jit
def _to_uint8(v, CLAMP: tl.constexpr):
    """reference.to_uint8: x * 255 truncated, wrapped modulo 256 (or clipped to [0, 1] first)."""
    if CLAMP:
        res = (tl.minimum(tl.maximum(v, 0.0), 1.0) * 255.0).to(tl.int32)
    else:
        w = v * 255.0
        ok = (w == w) & (tl.abs(w) < 2147483648.0)
        res = tl.where(ok, w, 0.0).to(tl.int32) & 255
    return res


@triton.jit
def _mixing(cur, partner, mix, a, b, p, seed, pix, ch, inv255, eps, CLAMP: tl.constexpr):
    """reference.mixing_op on a tile (the window is applied by the caller)."""
    if mix == MIX_ADD:
        p1 = tl.load(inv255 + cur)
        p2 = tl.load(inv255 + partner)
        res = _to_uint8(((a * (p1 * 2 - 1) + b * (p2 * 2 - 1)) + 1) * 0.5, CLAMP)
    elif mix == MIX_MULTIPLY:
        p1 = tl.load(inv255 + cur)
        p2 = tl.load(inv255 + partner)
        res = _to_uint8((_powf(p1 * 2, a) * _powf(tl.maximum(p2 * 2, eps), b)) * 0.5, CLAMP)
    else:
        # random_pixels / random_elems: counter-hash noise of (seed, pixel or element index)
        index = tl.where(mix == MIX_RANDOM_ELEMS, pix * 3 + ch, pix + ch * 0).to(tl.uint32)
        hs = _hash32(seed.to(tl.uint32))
        u = (_hash32(index ^ hs) >> 8).to(tl.float32) * (1.0 / 16777216.0)
        res = tl.where(u < p, cur, partner)
    return res


@triton.jit
def _step_kernel(x_ptr, f_ptr, rec_ptr, src_ptr, dst_ptr, lut_ptr, mean_ptr, rot_ptr, inv255,
                 ops_map, eps, j, A: tl.constexpr, K: tl.constexpr, T: tl.constexpr,
                 L: tl.constexpr, H: tl.constexpr, W: tl.constexpr, NOPS: tl.constexpr,
                 FIRST: tl.constexpr, CLAMP: tl.constexpr, BP: tl.constexpr):
    q = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    HW = H * W
    HW3 = HW * 3
    st, b, act_img, act_p, self_mix = _step_record(rec_ptr, q, j, A, K, T, L)
    top = tl.load(st + F_TOP).to(tl.int32)
    left = tl.load(st + F_LEFT).to(tl.int32)
    height = tl.load(st + F_HEIGHT).to(tl.int32)
    width = tl.load(st + F_WIDTH).to(tl.int32)

    p0 = tile * BP
    pix = p0 + tl.arange(0, BP)[:, None]
    ch = tl.arange(0, 4)[None, :]
    mask = (pix < HW) & (ch < 3)
    rows = pix // W
    cols = pix % W
    e = pix * 3 + ch
    cur_img, op_img = _step_source(x_ptr, src_ptr, q, b, act_img, HW3, FIRST)
    cur = tl.load(cur_img + e, mask=mask, other=0).to(tl.int32)
    # a patch touches this tile only if their rows overlap
    mixes = act_p & (p0 // W < top + height) & ((p0 + BP - 1) // W >= top)
    out = cur
    r = cur
    if act_img | (mixes & self_mix):
        op = _table_op(st, act_img, ops_map, NOPS)
        mag = tl.where(act_img, tl.load(st + F_MAG), tl.load(st + F_SELF_MAG))
        r = _image_op(op_img, op, mag, lut_ptr + q * 768, tl.load(mean_ptr + q), rot_ptr,
                      pix, rows, cols, ch, mask, H, W)
        out = r
    if mixes:
        if self_mix:
            partner = r
        else:
            partner = tl.load(f_ptr + b * HW3 + e, mask=mask, other=0).to(tl.int32)
        mixed = _mixing(cur, partner, tl.load(st + F_MIX).to(tl.int32), tl.load(st + F_A),
                        tl.load(st + F_B), tl.load(st + F_P), tl.load(st + F_SEED), pix, ch,
                        inv255, eps, CLAMP)
        inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
        out = tl.where(inside, mixed, cur)
    tl.store(dst_ptr + q * HW3 + e, out.to(tl.uint8), mask=mask)


# ---------------------------------------------------------------------------------------------
# The final mix.

@triton.jit
def _normalized(v, inv255, mean, std):
    return tl.math.div_rn(tl.load(inv255 + v) - mean, std)


@triton.jit
def _finish_kernel(x_ptr, rec_ptr, chains_ptr, out_ptr, inv255, m0, m1, m2, s0, s1, s2,
                   A: tl.constexpr, K: tl.constexpr, L: tl.constexpr, V: tl.constexpr,
                   H: tl.constexpr, W: tl.constexpr, CLEAN: tl.constexpr,
                   CHAINS_ARE_X: tl.constexpr, CHANNELS_LAST: tl.constexpr, BP: tl.constexpr):
    bv = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    b = bv // V
    v = bv % V
    HW = H * W
    HW3 = HW * 3
    pix = tile * BP + tl.arange(0, BP)[:, None]
    ch = tl.arange(0, 4)[None, :]
    mask = (pix < HW) & (ch < 3)
    e = pix * 3 + ch
    mean = tl.where(ch == 0, m0, tl.where(ch == 1, m1, m2))
    std = tl.where(ch == 0, s0, tl.where(ch == 1, s1, s2))
    xv = tl.load(x_ptr + b * HW3 + e, mask=mask, other=0).to(tl.int32)
    res = _normalized(xv, inv255, mean, std)                 # the clean view
    if v >= CLEAN:
        n = b * A + (v - CLEAN)
        rec = rec_ptr + n * L
        skip = tl.load(rec)
        mix = res * 0.0
        for i in tl.static_range(K):
            w = tl.load(rec + 1 + i * NCF + CF_WEIGHT)
            if CHAINS_ARE_X:
                cv = xv
            else:
                cv = tl.load(chains_ptr + (n * K + i) * HW3 + e, mask=mask, other=0).to(tl.int32)
            mix += w * _normalized(cv, inv255, mean, std)
        res = (1 - skip) * res + skip * mix
    if CHANNELS_LAST:
        dst = out_ptr + bv * HW3 + e
    else:
        dst = out_ptr + bv * HW3 + ch * HW + pix
    tl.store(dst, res.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host side.

_TABLES = {}
_TABLES_LOCK = threading.Lock()


def _cached(key, build):
    with _TABLES_LOCK:
        t = _TABLES.get(key)
        if t is None:
            t = _TABLES[key] = build()
    return t


def _as_device(a, device, dtype=torch.float32):
    return torch.as_tensor(np.asarray(a), dtype=dtype).to(device)


def _config_tables(cfg: C.IPMixConfig, device: torch.device):
    """The decoder's op and patch-size tables (cached per config and device)."""
    return _cached(("cfg", cfg, device.type, device.index), lambda: {
        "ops": [_as_device(v, device) for v in T._op_tables(cfg)],
        "sizes": _as_device(np.asarray(cfg.patch_sizes, np.float32), device)})


def _launch(kernel, grid, *args, **kw):
    if INTERPRETED:
        kw.pop("num_warps", None)
    else:
        # keep a * b + c rounded twice, as PIL and NumPy do
        kw["enable_fp_fusion"] = False
    kernel[grid](*args, **kw)


def _check_device(x: torch.Tensor):
    if x.device.type == "cpu" and not INTERPRETED:
        raise ValueError("impl='triton' on CPU tensors runs through Triton's interpreter: set "
                         "TRITON_INTERPRET=1 before importing dali_ipmix (or use impl='torch')")
    if x.device.type == "cuda" and INTERPRETED:
        raise ValueError("TRITON_INTERPRET=1 is set: Triton kernels run on the CPU only; unset it "
                         "to run them on the GPU")


def decode(uniforms: torch.Tensor, cfg: C.IPMixConfig) -> torch.Tensor:
    """Tapes [..., L] from raw uniforms [..., U] (``tape.uniform_size(cfg)``), one launch."""
    _check_device(uniforms)
    U = T.uniform_size(cfg)
    if uniforms.shape[-1] != U:
        raise ValueError(f"uniforms have {uniforms.shape[-1]} values per view, this config needs {U}")
    lead = tuple(uniforms.shape[:-1])
    u = uniforms.reshape(-1, U).to(torch.float32).contiguous()
    L = T.TapeLayout(cfg.k, cfg.t).size
    out = torch.empty((u.shape[0], L), dtype=torch.float32, device=u.device)
    if u.shape[0]:
        tab = _config_tables(cfg, u.device)
        _launch(_decode_kernel, (u.shape[0],), u, out, *tab["ops"], tab["sizes"],
                float(np.float32(cfg.severity - 0.1)), float(np.float32(1.0 / cfg.beta)),
                float(np.float32(cfg.square_prob)), 1.0 if cfg.self_mix else 0.0,
                K=cfg.k, T=cfg.t, U=U, L=L, NOPS=len(cfg.ops), NSIZES=len(cfg.patch_sizes),
                DEPTH_MIN=cfg.depth_min, S=cfg.image_size,
                KT_PAD=max(2, triton.next_power_of_2(max(1, cfg.k * cfg.t))))
    return out.reshape(lead + (L,))


def _ops_map(ops, device: torch.device) -> torch.Tensor:
    """int32 [len(ops)]: each op's place in ``config.OP_TABLE`` (cached per op list and device)."""
    return _cached(("ops", tuple(ops), device.type, device.index),
                   lambda: _as_device([C.op_index(n) for n in ops], device, torch.int32))


def chains(x: torch.Tensor, f: torch.Tensor, tapes: torch.Tensor, cfg: C.IPMixConfig, ops=None):
    """The chain results uint8 [B * A * k, H, W, 3] (sample-major, then view, then chain) of
    tapes [B, A, L] on images x and mixing pictures f uint8 [B, H, W, 3]; 2 launches a step.
    The tapes' op indices index ``ops`` (default ``cfg.ops``).  Returns None when t = 0 (every
    chain is x)."""
    B, H, W, _ = x.shape
    A = tapes.shape[1]
    L = tapes.shape[2]
    Q = B * A * cfg.k
    if cfg.t == 0 or Q == 0:
        return None
    tab = image_tables(H, W, x.device)
    bufs = [torch.empty((Q, H, W, 3), dtype=torch.uint8, device=x.device) for _ in range(min(2, cfg.t))]
    lut = torch.empty((Q, 3, 256), dtype=torch.int32, device=x.device)
    mean = torch.zeros((Q,), dtype=torch.int32, device=x.device)
    ops = cfg.ops if ops is None else tuple(ops)
    ops_map = _ops_map(ops, x.device)
    common = dict(A=A, K=cfg.k, T=cfg.t, L=L, H=H, W=W, NOPS=len(ops))
    src = bufs[0]                      # not read at step 0
    for j in range(cfg.t):
        dst = bufs[j % 2]
        first = j == 0
        _launch(_tables_kernel, (Q, 3), x, tapes, src, lut, mean, tab.scale, ops_map, j,
                FIRST=first, BLOCK=BLOCK_SCAN, **common)
        _launch(_step_kernel, (Q, triton.cdiv(H * W, BLOCK_PIXELS)), x, f, tapes, src, dst, lut,
                mean, tab.rot, tab.inv255, ops_map, float(np.float32(C.MULTIPLY_EPS)), j,
                FIRST=first, CLAMP=cfg.overflow == "clamp", BP=BLOCK_PIXELS, num_warps=STEP_WARPS,
                **common)
        src = dst
    return src


def finish(x: torch.Tensor, chain_out, tapes: torch.Tensor, cfg: C.IPMixConfig,
           out_dtype: torch.dtype, channels_last_out: bool) -> torch.Tensor:
    """The views [B, V, 3, H, W] (or [B, V, H, W, 3]): one launch."""
    B, H, W, _ = x.shape
    A, L = tapes.shape[1], tapes.shape[2]
    V = A + (1 if cfg.jsd else 0)
    # The interpreter's float32 -> bfloat16 cast truncates; torch's rounds to nearest even.
    kernel_dtype = torch.float32 if INTERPRETED and out_dtype == torch.bfloat16 else out_dtype
    shape = (B, V, H, W, 3) if channels_last_out else (B, V, 3, H, W)
    out = torch.empty(shape, dtype=kernel_dtype, device=x.device)
    if B:
        tab = image_tables(H, W, x.device)
        mean = [float(np.float32(m)) for m in cfg.mean]
        std = [float(np.float32(s)) for s in cfg.std]
        _launch(_finish_kernel, (B * V, triton.cdiv(H * W, BLOCK_PIXELS)), x, tapes,
                x if chain_out is None else chain_out, out, tab.inv255, *mean, *std,
                A=A, K=cfg.k, L=L, V=V, H=H, W=W, CLEAN=1 if cfg.jsd else 0,
                CHAINS_ARE_X=chain_out is None, CHANNELS_LAST=bool(channels_last_out),
                BP=BLOCK_PIXELS)
    return out.to(out_dtype)


def views(x: torch.Tensor, f: torch.Tensor, tapes: torch.Tensor, cfg: C.IPMixConfig,
          out_dtype: torch.dtype = torch.float32, channels_last_out: bool = False) -> torch.Tensor:
    """All views of a batch from tapes [B, A, L] (see ``fused.ipmix_views``)."""
    _check_device(x)
    x, f, tapes = x.contiguous(), f.contiguous(), tapes.contiguous()
    return finish(x, chains(x, f, tapes, cfg), tapes, cfg, out_dtype, channels_last_out)


# ---------------------------------------------------------------------------------------------
# Single steps (fused.image_op / fused.mixing_op with impl="triton"): one chain of one step.

_ONE_STEP = C.IMAGENET.replace(k=1, t=1, jsd=False)


def one_step(x: torch.Tensor, partner: torch.Tensor, fields: dict, overflow: str = "wrap",
             ops=C.IMAGE_OPS):
    """One chain step on every image of x (uint8 [B, H, W, 3]), its tape fields given by name
    (``tape.STEP_FIELDS``) as [B] tensors, the op field indexing ``ops``; ``partner`` is the
    mixing picture."""
    _check_device(x)
    lay = T.TapeLayout(1, 1)
    B = x.shape[0]
    tapes = torch.zeros((B, 1, lay.size), dtype=torch.float32, device=x.device)
    _, chain_fields, steps = lay.unpack(tapes)
    chain_fields[:, 0, 0, T.CF["weight"]] = 1.0
    chain_fields[:, 0, 0, T.CF["depth"]] = 1.0
    for name, value in fields.items():
        steps[:, 0, 0, 0, T.SF[name]] = value.reshape(B).to(device=x.device, dtype=torch.float32)
    return chains(x.contiguous(), partner.contiguous(), tapes, _ONE_STEP.replace(overflow=overflow),
                  ops)
