"""The fast backend: the whole IPMix view computation for a batch, driven by tapes.

Every sample of a batch gets its own image op, mixing op, window and weights, read from the same
parameter tapes as the DALI graph (``dali_ipmix.ops``) and the NumPy/PIL reference
(``dali_ipmix.reference``).  Two implementations compute the same thing:

* ``impl="triton"`` -- the Triton kernels of ``dali_ipmix.triton_kernels`` (2t + 2 launches per
  batch, decoding the raw uniforms too); what the DALI node (``dali_ipmix.fused_node``) runs on
  the GPU.
* ``impl="torch"`` -- the batched eager torch code below (no Python loop over samples, only over
  the k chains and t steps); what the DALI node runs on the CPU (tests, the demo).

Images are uint8 ``[B, H, W, 3]`` between steps, exactly like PIL, so chains accumulate the same
uint8 rounding as the official code.  How the torch code computes each op (one entry per op in
the table of its family: ``_POINT_LUTS``, ``_AFFINE_COLUMNS``, ``_DEGENERATE``, checked against
``config.OP_TABLE`` at import):

* point ops -- equalize, posterize, solarize, invert, autocontrast -- build one 256-entry lookup
  table per sample and channel (``[B, 3, 256]``) and apply it with one gather.  Equalize and
  autocontrast use per-channel histograms and PIL's exact integer/double formulas.
* geometric ops -- rotate, shear_x/y, translate_x/y, mirror -- fold into ONE inverse affine warp
  with a per-sample 2x3 matrix in PIL's AFFINE convention (output pixel centre mapped through the
  matrix in double precision, fill 0 outside, bilinear of the edge-clamped neighbours,
  TRUNCATED to uint8 -- PIL does not round).  Rotation matrices for whole degrees are PIL's own
  (``exact_tables``), so they are bit-identical.
* ImageEnhance ops -- color, contrast, brightness, sharpness -- are ``Image.blend(degenerate,
  image, factor)`` in float32 with truncation and clipping, the degenerate image computed like
  Pillow (grey ``L``, contrast's integer mean, black, the 3x3 ``SMOOTH`` filter).
* mixings -- add, multiply, random_pixels, random_elems -- use the float32 formulas of
  ``reference.mixing_op`` in the same operation order and the same ``to_uint8`` wrap/clamp rule,
  over the whole image, then keep ``x1`` outside the window.

Fidelity (tests/test_fused.py and tests/test_triton.py, against ``reference`` on photographs):
the Triton kernels are bit-identical to the reference on every op, mixing and view under the
interpreter; the torch code is bit-identical on every op, and on the mixings except ``multiply``,
where torch's ``pow`` may differ from NumPy's by 1 ulp (rare pixels).  On CUDA, libdevice's
``pow``/``log`` may differ in the last bit too; the GPU tests bound the difference.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
import torch

from . import config as C
from . import noise
from .exact_tables import ImageTables, image_tables
from . import tape as T
from .tape import CF, SF, TapeLayout

__all__ = ["image_op", "mixing_op", "chain_step", "chains", "finish", "ipmix_views",
           "ipmix_views_from_uniforms", "default_impl", "IMPLS"]


_F32_1_13 = float(np.float32(1) / np.float32(13))     # Pillow divides the kernel in float32
_F32_5_13 = float(np.float32(5) / np.float32(13))
_INV_2_24 = float(np.float32(noise.INV_2_24))


# ---------------------------------------------------------------------------------------------
# Helpers

def _bcast(v: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    """[B] -> [B, 1, 1, 1] (broadcast over an image batch)."""
    return v.reshape((-1,) + (1,) * (ndim - 1))


def _where_apply(mask: torch.Tensor, fn, base: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)`` for the samples where ``mask`` [B] is true (run on those only), ``base``
    elsewhere."""
    idx = mask.nonzero().squeeze(1)
    n = idx.numel()
    if n == 0:
        return base
    if n == mask.shape[0]:
        return fn(*args)
    sel = fn(*[a.index_select(0, idx) for a in args])
    return base.index_copy(0, idx, sel.to(base.dtype))


def _op_mask(op: torch.Tensor, ops: Tuple[str, ...], names) -> torch.Tensor:
    m = torch.zeros_like(op, dtype=torch.bool)
    for i, n in enumerate(ops):
        if n in names:
            m = m | (op == i)
    return m


# ---------------------------------------------------------------------------------------------
# Geometric ops: one PIL-style inverse affine warp.

def _rotate_columns(m, one, H, W, rot):
    # angle % 360 (Python semantics), made robust to an inexact m / 360 under compilation
    ang = m - 360.0 * torch.floor(m * (1.0 / 360.0))
    ang = torch.where(ang >= 360.0, ang - 360.0, ang)
    ang = torch.where(ang < 0, ang + 360.0, ang)
    whole = ang == torch.floor(ang)
    idx = torch.floor(ang).clamp(0, 359).to(torch.long)
    exact = rot.index_select(0, idx)                                 # [B, 6]
    # Non-integer angles (never produced by tapes): same formula with torch's cos/sin.
    a = -(ang * (math.pi / 180.0))
    c = torch.round(torch.cos(a) * 1e15) / 1e15
    s = torch.round(torch.sin(a) * 1e15) / 1e15
    cx, cy = W / 2, H / 2
    approx = torch.stack([c, s, (c * -cx + s * -cy) + cx, -s, c, (-s * -cx + c * -cy) + cy], 1)
    return list(torch.where(whole[:, None], exact, approx).unbind(1))


# geometric op -> its AFFINE data (a, b, c, d, e, f) as float64 [B] columns, None where it keeps
# the identity's; from (magnitude, ones, H, W, PIL's rotation matrices)
_AFFINE_COLUMNS = {
    "rotate": _rotate_columns,
    "shear_x": lambda m, one, H, W, rot: [None, m, None, None, None, None],
    "shear_y": lambda m, one, H, W, rot: [None, None, None, m, None, None],
    "translate_x": lambda m, one, H, W, rot: [None, None, m, None, None, None],
    "translate_y": lambda m, one, H, W, rot: [None, None, None, None, None, m],
    "mirror": lambda m, one, H, W, rot: [-one, None, one * W, None, None, None],
}
C.check_implemented(_AFFINE_COLUMNS, "dali_ipmix.fused._AFFINE_COLUMNS", "geometric")


def _affine_matrices(op, mag, ops, H, W, rot):
    """Per-sample AFFINE data [B, 6] float64 (identity for non-geometric ops)."""
    B = op.shape[0]
    m = mag.to(torch.float64)
    one = torch.ones_like(m)
    zero = torch.zeros_like(m)
    cols = [one, zero, zero, zero, one, zero]
    for i, name in enumerate(ops):
        if _family(name) != "geometric":
            continue
        sel = op == i
        for c, v in enumerate(_AFFINE_COLUMNS[name](m, one, H, W, rot)):
            if v is not None:
                cols[c] = torch.where(sel, v, cols[c])
    return torch.stack(cols, 1).reshape(B, 6)


def _warp(x: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """PIL ``transform(AFFINE, mat, BILINEAR)`` (fill 0) of uint8 [B, H, W, 3]; mat [B, 6] f64."""
    B, H, W, Cc = x.shape
    dev = x.device
    xs = torch.arange(W, device=dev, dtype=torch.float64) + 0.5
    ys = torch.arange(H, device=dev, dtype=torch.float64) + 0.5
    a = [mat[:, i].reshape(B, 1, 1) for i in range(6)]
    xc = xs.reshape(1, 1, W)
    yc = ys.reshape(1, H, 1)
    xin = a[0] * xc + a[1] * yc + a[2]                                # [B, H, W]
    yin = a[3] * xc + a[4] * yc + a[5]
    inside = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
    xf = xin - 0.5
    yf = yin - 0.5
    x0 = torch.floor(xf)
    y0 = torch.floor(yf)
    dx = (xf - x0).reshape(B, H * W, 1)
    dy = (yf - y0).reshape(B, H * W, 1)
    # Clamp in float first (coordinates of far-away points may not fit an int).
    x0c = x0.clamp(0, W - 1).to(torch.long)
    x1c = (x0 + 1).clamp(0, W - 1).to(torch.long)
    y0c = y0.clamp(0, H - 1).to(torch.long)
    y1c = (y0 + 1).clamp(0, H - 1).to(torch.long)
    flat = x.reshape(B, H * W, Cc)

    def tap(yy, xx):
        idx = (yy * W + xx).reshape(B, H * W, 1).expand(B, H * W, Cc)
        return torch.gather(flat, 1, idx).to(torch.float64)

    p00, p01 = tap(y0c, x0c), tap(y0c, x1c)
    p10, p11 = tap(y1c, x0c), tap(y1c, x1c)
    v1 = p00 + (p01 - p00) * dx
    v2 = p10 + (p11 - p10) * dx
    v = v1 + (v2 - v1) * dy
    v = torch.where(inside.reshape(B, H * W, 1), torch.trunc(v), torch.zeros_like(v))
    return v.to(torch.uint8).reshape(B, H, W, Cc)


def _geometric(x, op, mag, ops, tables: ImageTables):
    B, H, W, _ = x.shape
    return _warp(x, _affine_matrices(op, mag, ops, H, W, tables.rot))


# ---------------------------------------------------------------------------------------------
# Point ops: one per-sample, per-channel lookup table.

def _histogram(x: torch.Tensor) -> torch.Tensor:
    """Per-sample per-channel 256-bin histograms of uint8 [B, H, W, 3] -> int64 [B, 3, 256]."""
    B = x.shape[0]
    Cc = x.shape[-1]
    off = torch.arange(Cc, device=x.device, dtype=torch.int64) * 256
    idx = (x.to(torch.int64) + off).reshape(B, -1)
    h = torch.zeros(B, Cc * 256, device=x.device, dtype=torch.int32)
    h = h.scatter_add(1, idx, torch.ones_like(idx, dtype=torch.int32))
    return h.reshape(B, Cc, 256).to(torch.int64)


def _equalize_lut(h: torch.Tensor, ident: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.equalize``: h int64 [B, 3, 256] -> LUT int64 [B, 3, 256]."""
    nz = h > 0
    nnz = nz.sum(-1)
    last = torch.where(nz, ident, torch.full_like(ident, -1)).amax(-1)
    h_last = torch.gather(h, -1, last.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    step = (h.sum(-1) - h_last) // 255
    cum_excl = torch.cumsum(h, -1) - h
    lut = (torch.div(step, 2, rounding_mode="floor").unsqueeze(-1) + cum_excl) \
        // step.clamp(min=1).unsqueeze(-1)
    keep = ((nnz <= 1) | (step == 0)).unsqueeze(-1)
    return torch.where(keep, ident, lut)


def _autocontrast_lut(h: torch.Tensor, cutoff: torch.Tensor, ident: torch.Tensor,
                      scale_table: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.autocontrast(img, cutoff)`` (cutoff >= 0 percent, same at both ends)."""
    n = h.sum(-1)                                                     # [B, 3]
    c = cutoff.to(torch.float64).reshape(-1, 1)
    # cut = int(n * cutoff // 100): Python's float floor division is the exact floor of the
    # quotient; a rounded quotient is corrected by one where needed.
    v = n.to(torch.float64) * c
    q = torch.floor(v * 0.01)
    q = torch.where(q * 100.0 > v, q - 1, q)
    q = torch.where((q + 1) * 100.0 <= v, q + 1, q)
    cut = q.to(torch.int64)
    cum_incl = torch.cumsum(h, -1)
    suffix_incl = n.unsqueeze(-1) - cum_incl + h
    # After the cut loops: lo = first bin whose inclusive cumulative count exceeds the cut, hi =
    # last bin whose inclusive suffix count exceeds it (equivalent whenever the answer is not the
    # identity; see the tests for the degenerate cases).
    lo = (cum_incl <= cut.unsqueeze(-1)).sum(-1)
    hi = 255 - (suffix_incl <= cut.unsqueeze(-1)).sum(-1)
    # scale = 255.0 / (hi - lo), looked up: torch's ``255.0 / t`` is reciprocal-then-multiply
    scale = scale_table[(hi - lo).clamp(1, 255).reshape(-1)].reshape(hi.shape)
    offset = (-lo).to(torch.float64) * scale
    v = ident.to(torch.float64) * scale.unsqueeze(-1) + offset.unsqueeze(-1)
    lut = torch.trunc(v).clamp(0, 255).to(torch.int64)
    return torch.where((hi <= lo).unsqueeze(-1), ident, lut)


def _posterize_lut(ident, h, m3, mag, tables):
    # ImageOps.posterize(img, int(m)): i & ~(2^(8-bits) - 1)
    shift = (8 - torch.trunc(m3)).clamp(0, 8).to(torch.int64)
    return torch.bitwise_left_shift(torch.bitwise_right_shift(ident, shift), shift)


# point op -> its lookup tables int64 [B, 3, 256], from (the identity tables, the histograms
# [B, 3, 256] when an op of ``ops`` needs them, the magnitude as [B, 1, 1] and as [B], the tables)
_POINT_LUTS = {
    "equalize": lambda ident, h, m3, mag, tables: _equalize_lut(h, ident),
    "posterize": _posterize_lut,
    "solarize": lambda ident, h, m3, mag, tables: torch.where(ident.to(torch.float32) < m3, ident,
                                                              255 - ident),
    "invert": lambda ident, h, m3, mag, tables: 255 - ident,
    "autocontrast": lambda ident, h, m3, mag, tables: _autocontrast_lut(h, mag, ident,
                                                                        tables.scale),
}
C.check_implemented(_POINT_LUTS, "dali_ipmix.fused._POINT_LUTS", "point")


def _point_ops(x, op, mag, ops, tables: ImageTables):
    B, H, W, Cc = x.shape
    dev = x.device
    ident = torch.arange(256, device=dev, dtype=torch.int64).expand(B, Cc, 256)
    lut = ident
    m3 = mag.reshape(B, 1, 1)
    o3 = op.reshape(B, 1, 1)
    h = _histogram(x) if any(C.OPS_BY_NAME[n].histogram for n in ops) else None
    for i, name in enumerate(ops):
        if _family(name) == "point":
            lut = torch.where(o3 == i, _POINT_LUTS[name](ident, h, m3, mag, tables), lut)
    lut = lut.clamp(0, 255)                                           # Image.point clips
    off = torch.arange(Cc, device=dev, dtype=torch.int64) * 256
    idx = (x.to(torch.int64) + off).reshape(B, -1)
    out = torch.gather(lut.reshape(B, Cc * 256), 1, idx)
    return out.to(torch.uint8).reshape(B, H, W, Cc)


# ---------------------------------------------------------------------------------------------
# ImageEnhance ops: Image.blend(degenerate, image, factor).

def _gray_l(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16, int32 [B, H, W]."""
    xi = x.to(torch.int32)
    return (xi[..., 0] * 19595 + xi[..., 1] * 38470 + xi[..., 2] * 7471 + 0x8000) >> 16


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """Pillow's ``ImageFilter.SMOOTH`` on uint8 [B, H, W, 3] (float32 [B, H, W, 3] result)."""
    p = x.to(torch.float32)
    H, W = x.shape[1], x.shape[2]
    if H < 3 or W < 3:
        return p
    k1, k5 = _F32_1_13, _F32_5_13

    def row(r, kc):
        return (p[:, r, :-2] * k1 + p[:, r, 1:-1] * kc) + p[:, r, 2:] * k1

    ss = row(slice(2, H), k1) + 0.5         # Filter.c: ss = offset + 0.5; ss += row(y+1) ...
    ss = ss + row(slice(1, H - 1), k5)
    ss = ss + row(slice(0, H - 2), k1)
    inner = torch.trunc(ss).clamp(0, 255)    # clip8: <=0 -> 0, >=255 -> 255, else truncate
    mid = torch.cat([p[:, 1:-1, :1], inner, p[:, 1:-1, -1:]], 2)
    return torch.cat([p[:, :1], mid, p[:, -1:]], 1)


def _contrast_mean(x, xf):
    """ImageEnhance.Contrast's degenerate: int(mean(L) + 0.5), in integers, [B, 1, 1, 1]."""
    H, W = x.shape[1], x.shape[2]
    s = _gray_l(x).to(torch.int64).sum((1, 2))
    n = H * W
    return _bcast(torch.div(2 * s + n, 2 * n, rounding_mode="floor").to(torch.float32))


# enhance op -> the degenerate image ``Image.blend`` starts from, float32 broadcastable to
# [B, H, W, 3], from (the uint8 images, the same as float32)
_DEGENERATE = {
    "color": lambda x, xf: _gray_l(x).to(torch.float32).unsqueeze(-1),
    "contrast": _contrast_mean,
    "brightness": lambda x, xf: torch.zeros_like(xf),
    "sharpness": lambda x, xf: _smooth(x),
}
C.check_implemented(_DEGENERATE, "dali_ipmix.fused._DEGENERATE", "enhance")


def _blend_ops(x, op, mag, ops, tables: ImageTables):
    xf = x.to(torch.float32)
    o4 = _bcast(op)
    deg = torch.zeros_like(xf)
    for i, name in enumerate(ops):
        if _family(name) == "enhance":
            deg = torch.where(o4 == i, _DEGENERATE[name](x, xf), deg)
    # Blend.c: (float) in1 + alpha * (in2 - in1), truncated, clipped to [0, 255]
    v = deg + _bcast(mag.to(torch.float32)) * (xf - deg)
    return torch.trunc(v).clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Public: image ops.

# op family -> the batched torch code of its ops (each family's table above has one entry per op)
_FAMILY_KERNELS = {"point": _point_ops, "geometric": _geometric, "enhance": _blend_ops}
if set(_FAMILY_KERNELS) != set(C.FAMILIES):
    raise NotImplementedError(f"dali_ipmix.fused._FAMILY_KERNELS has {sorted(_FAMILY_KERNELS)}, "
                              f"config.FAMILIES {sorted(C.FAMILIES)}")


def _family(name: str) -> str:
    rec = C.OPS_BY_NAME.get(name)
    if rec is None:
        raise ValueError(f"unknown image op {name!r}: choose among {', '.join(C.ALL_IMAGE_OPS)}")
    if rec.family not in _FAMILY_KERNELS:
        raise NotImplementedError(f"image op {name!r}: family {rec.family!r} has no torch code in "
                                  f"dali_ipmix.fused._FAMILY_KERNELS")
    return rec.family


def _image_ops(x, op, mag, ops, tables: ImageTables):
    out = x
    for family, kernel in _FAMILY_KERNELS.items():
        members = [n for n in ops if _family(n) == family]
        if members:
            out = _where_apply(_op_mask(op, ops, members),
                               lambda a, o, m, kernel=kernel: kernel(a, o, m, ops, tables),
                               out, x, op, mag)
    return out


def image_op(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor,
              ops: Sequence[str] = C.IMAGE_OPS, impl: str = "torch") -> torch.Tensor:
    """One image op per sample, as PIL computes it (``reference.image_op``).

    x uint8 [B, H, W, 3]; op long [B] (index into ``ops``, e.g. ``cfg.ops``); mag float32 [B]
    (the value handed to PIL: ``config.magnitude``).  An op index outside ``ops`` leaves the
    sample unchanged.  ``impl``: "torch" (eager) or "triton" (see ``ipmix_views``).
    """
    ops = tuple(ops)
    if x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"image_op wants uint8 [B, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    op = torch.as_tensor(op, device=x.device).to(torch.long).reshape(-1)
    mag = torch.as_tensor(mag, device=x.device).to(torch.float32).reshape(-1)
    if checked_impl(impl) == "triton":
        from . import triton_kernels as TK
        for name in ops:
            _family(name)                                # one-line error for unknown names
        if "rotate" in ops:
            rotate = op == ops.index("rotate")
            if not torch.equal(mag[rotate], torch.floor(mag[rotate])):
                raise ValueError("impl='triton' rotates by whole degrees only (what tapes hold); "
                                 "use impl='torch' for fractional angles")
        return TK.one_step(x, x, {"active_img": torch.ones_like(mag), "op": op, "mag": mag},
                           ops=ops)
    return _image_ops(x, op, mag, ops, image_tables(x.shape[1], x.shape[2], x.device))


# ---------------------------------------------------------------------------------------------
# Mixings.

def _to_uint8(v: torch.Tensor, overflow: str) -> torch.Tensor:
    """``reference.to_uint8`` on float32 in [0, 1]-ish values."""
    if overflow == "clamp":
        return torch.trunc(v.clamp(0, 1) * 255.0).to(torch.uint8)
    v = v * 255.0
    ok = torch.isfinite(v) & (v.abs() < 2.0 ** 31)
    v = torch.where(ok, v, torch.zeros_like(v))
    return (torch.trunc(v).to(torch.int64) & 255).to(torch.uint8)


def _div255(x, inv255):
    """x / 255 in float32, correctly rounded (a table look-up: ``exact_tables.ImageTables.inv255``)."""
    return inv255[x.to(torch.int64)]


def _mix_add(x1, x2, a, b, overflow, inv255):
    p1 = _div255(x1, inv255)
    p2 = _div255(x2, inv255)
    mixed = ((_bcast(a) * (p1 * 2 - 1) + _bcast(b) * (p2 * 2 - 1)) + 1) / 2
    return _to_uint8(mixed, overflow)


def _mix_multiply(x1, x2, a, b, overflow, inv255):
    p1 = _div255(x1, inv255)
    p2 = _div255(x2, inv255)
    eps = torch.full((), C.MULTIPLY_EPS, dtype=torch.float32, device=x1.device)
    mixed = (torch.pow(p1 * 2, _bcast(a)) * torch.pow(torch.maximum(p2 * 2, eps), _bcast(b))) / 2
    return _to_uint8(mixed, overflow)


def _mix_random(x1, x2, p, seed, elems):
    """random_pixels (elems False) / random_elems (True): take x1 where u < p.  In-range values
    round-trip exactly through /255 and to_uint8, so the select is done on uint8 directly."""
    B, H, W, Cc = x1.shape
    dev = x1.device
    pix = torch.arange(H * W, device=dev, dtype=torch.int64).reshape(1, H, W, 1)
    ch = torch.arange(Cc, device=dev, dtype=torch.int64).reshape(1, 1, 1, Cc)
    index = torch.where(_bcast(elems), pix * Cc + ch, pix)          # [B, H, W, Cc]
    hs = noise.hash32(seed.to(torch.int64))                           # [B]
    bits = noise.hash32(index ^ _bcast(hs)) >> 8
    u = bits.to(torch.float32) * _INV_2_24
    return torch.where(u < _bcast(p.to(torch.float32)), x1, x2)


def _window_mask(window, H, W, device):
    win = window.to(torch.int64)
    top, left, h, w = (_bcast(win[:, i]) for i in range(4))
    rows = torch.arange(H, device=device).reshape(1, H, 1, 1)
    cols = torch.arange(W, device=device).reshape(1, 1, W, 1)
    return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)


def mixing_op(x1: torch.Tensor, x2: torch.Tensor, mix: torch.Tensor, a: torch.Tensor,
            b: torch.Tensor, p: torch.Tensor, seed: torch.Tensor, window: torch.Tensor,
            overflow: str = "wrap", impl: str = "torch") -> torch.Tensor:
    """One P-level mixing per sample, as ``reference.mixing_op`` computes it.

    x1, x2 uint8 [B, H, W, 3]; mix long [B] (0 add, 1 multiply, 2 random_pixels,
    3 random_elems); a, b, p float32 [B]; seed [B] (float32 holding an integer < 2^24);
    window [B, 4] = (top, left, height, width).  Outside the window the result is x1.
    ``impl``: "torch" (eager) or "triton" (see ``ipmix_views``).
    """
    if overflow not in ("wrap", "clamp"):
        raise ValueError(f"overflow must be 'wrap' or 'clamp', got {overflow!r}")
    dev = x1.device
    as_t = lambda v, dt: torch.as_tensor(v, device=dev).to(dt)  # noqa: E731
    B = x1.shape[0]
    mix = as_t(mix, torch.long).reshape(B)
    a, b, p = (as_t(v, torch.float32).reshape(B) for v in (a, b, p))
    seed = as_t(seed, torch.float32).reshape(B)
    window = as_t(window, torch.float32).reshape(B, 4)
    x2 = x2.to(dev)
    if checked_impl(impl) == "triton":
        from . import triton_kernels as TK
        fields = dict(zip(("top", "left", "height", "width"), window.unbind(1)))
        fields.update(active_p=torch.ones_like(a), mix=mix, a=a, b=b, p=p, seed=seed)
        return TK.one_step(x1, x2, fields, overflow)
    return _mixings(x1, x2, mix, a, b, p, seed, window, overflow,
                    image_tables(x1.shape[1], x1.shape[2], dev))


def _mixings(x1, x2, mix, a, b, p, seed, window, overflow, tables: ImageTables):
    B, H, W, _ = x1.shape
    inv255 = tables.inv255
    q = x1
    q = _where_apply(mix == 0, lambda u, v, aa, bb: _mix_add(u, v, aa, bb, overflow, inv255),
                     q, x1, x2, a, b)
    q = _where_apply(mix == 1, lambda u, v, aa, bb: _mix_multiply(u, v, aa, bb, overflow, inv255),
                     q, x1, x2, a, b)
    q = _where_apply(mix >= 2, _mix_random, q, x1, x2, p, seed, mix == 3)
    return torch.where(_window_mask(window, H, W, x1.device), q, x1)


# ---------------------------------------------------------------------------------------------
# The IPMix views.

def chain_step(cur, x, f, st, ops, self_mix_on, overflow, tables: ImageTables):
    """One chain step for a batch (``reference.chain_step``): st float32 [B, len(STEP_FIELDS)]."""
    col = lambda n: st[:, SF[n]]  # noqa: E731
    act_img = col("active_img") > 0
    act_p = (col("active_p") > 0) & ~act_img
    if self_mix_on:
        self_mix = act_p & (col("self_mix") > 0)
    else:
        self_mix = torch.zeros_like(act_p)
    src = torch.where(_bcast(act_img), cur, x)
    op = torch.where(act_img, col("op"), col("self_op")).to(torch.long)
    mag = torch.where(act_img, col("mag"), col("self_mag"))
    r = _where_apply(act_img | self_mix, lambda s, o, m: _image_ops(s, o, m, ops, tables),
                     src, src, op, mag)
    partner = torch.where(_bcast(self_mix), r, f)
    window = torch.stack([col("top"), col("left"), col("height"), col("width")], 1)
    mixed = _where_apply(
        act_p,
        lambda c, pr, mx, a, b, p, sd, win: _mixings(c, pr, mx, a, b, p, sd, win, overflow, tables),
        cur, cur, partner, col("mix").to(torch.long), col("a"), col("b"), col("p"), col("seed"),
        window)
    return torch.where(_bcast(act_img), r, mixed)


def _normalize_hwc(v01: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
    m = torch.tensor(mean, dtype=torch.float32, device=v01.device)
    s = torch.tensor(std, dtype=torch.float32, device=v01.device)
    return (v01 - m) / s


def finish(x, chains_out, weights, skip, cfg, A, out_dtype, channels_last_out):
    """Final mix of one batch of views: x uint8 [A*B, H, W, 3], chains_out list of k uint8,
    weights [A*B, k], skip [A*B] -> [B, V, 3, H, W] (or [B, V, H, W, 3])."""
    AB, H, W, Cc = x.shape
    B = AB // A
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for i, cur in enumerate(chains_out):
        acc = acc + _bcast(weights[:, i]) * cur.to(torch.float32)
    m = _bcast(skip)
    xf = x.to(torch.float32)
    final = (1 - m) * xf / 255.0 + m * acc / 255.0
    views = _normalize_hwc(final, cfg.mean, cfg.std).reshape(A, B, H, W, Cc).transpose(0, 1)
    if cfg.jsd:
        clean = _normalize_hwc(xf[:B] / 255.0, cfg.mean, cfg.std).unsqueeze(1)
        views = torch.cat([clean, views], 1)
    if not channels_last_out:
        views = views.permute(0, 1, 4, 2, 3)
    return views.to(out_dtype).contiguous()


IMPLS = ("torch", "triton")


def checked_impl(impl: str) -> str:
    """``impl`` when it names an implementation (``IMPLS``), else a one-line error."""
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r}: choose one of {', '.join(IMPLS)}")
    return impl


def default_impl(device) -> str:
    """The implementation the DALI node uses on ``device``: the Triton kernels on CUDA, eager
    torch on the CPU (where Triton only interprets)."""
    return "triton" if torch.device(device).type == "cuda" else "torch"


def _prepare(x, f, tapes, cfg):
    if x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"ipmix_views wants uint8 [B, H, W, 3] images, got {x.dtype} {tuple(x.shape)}")
    if f.shape != x.shape or f.dtype != torch.uint8:
        raise ValueError(f"mixing pictures must match the images: {tuple(f.shape)} vs {tuple(x.shape)}")
    A = cfg.n_aug
    lay = TapeLayout(cfg.k, cfg.t)
    B = x.shape[0]
    tapes = torch.as_tensor(tapes).to(device=x.device, dtype=torch.float32)
    if tapes.dim() == 2 and A == 1:
        tapes = tapes.unsqueeze(1)
    if tuple(tapes.shape) != (B, A, lay.size):
        raise ValueError(f"tapes must be [B={B}, A={A}, L={lay.size}] for this config, got "
                         f"{tuple(tapes.shape)}")
    f = f.to(x.device)
    return x, f, tapes


def chains(X, F, steps, cfg, tables: ImageTables):
    """The k chain results (``reference.chains`` for a batch): X, F uint8 [N, H, W, 3], steps
    [N, k, t, len(STEP_FIELDS)]; a list of k uint8 [N, H, W, 3]."""
    ops = tuple(cfg.ops)
    outs = []
    for i in range(cfg.k):
        cur = X
        for j in range(cfg.t):
            cur = chain_step(cur, X, F, steps[:, i, j].contiguous(), ops, cfg.self_mix,
                             cfg.overflow, tables)
        outs.append(cur)
    return outs


def _views_impl(x, f, tapes, cfg, out_dtype, channels_last_out, tables: ImageTables):
    A = cfg.n_aug
    B = x.shape[0]
    lay = TapeLayout(cfg.k, cfg.t)
    tp = tapes.transpose(0, 1).reshape(A * B, lay.size)              # view-major batch
    skip, chain_f, steps = lay.unpack(tp)
    X = x.repeat(A, 1, 1, 1) if A > 1 else x
    F = f.repeat(A, 1, 1, 1) if A > 1 else f
    return finish(X, chains(X, F, steps, cfg, tables), chain_f[:, :, CF["weight"]], skip, cfg, A,
                  out_dtype, channels_last_out)


def ipmix_views(x: torch.Tensor, f: torch.Tensor, tapes, cfg: C.IPMixConfig,
                out_dtype: torch.dtype = torch.float32, channels_last_out: bool = False,
                impl: str = "torch"):
    """All views of a batch (``reference.ipmix_views`` for every sample).

    x, f uint8 [B, H, W, 3] (any device, same size); tapes float32 [B, A, L] with A =
    ``cfg.n_aug`` (``[B, L]`` accepted when A = 1).  Returns normalised (cfg.mean / cfg.std)
    ``[B, V, 3, H, W]`` (``[B, V, H, W, 3]`` with ``channels_last_out``) in ``out_dtype``, V =
    ``cfg.views`` (clean, IPMix 1, IPMix 2 with JSD, else one IPMix view).

    ``impl="torch"``: batched eager torch ops (any device).  ``impl="triton"``: the Triton
    kernels of ``dali_ipmix.triton_kernels`` (2t + 2 launches) on CUDA tensors, or on CPU tensors
    through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before the import.
    """
    x, f, tapes = _prepare(x, f, tapes, cfg)
    if checked_impl(impl) == "triton":
        from . import triton_kernels as TK
        return TK.views(x, f, tapes, cfg, out_dtype, channels_last_out)
    tables = image_tables(x.shape[1], x.shape[2], x.device)
    return _views_impl(x, f, tapes, cfg, out_dtype, channels_last_out, tables)


def ipmix_views_from_uniforms(x: torch.Tensor, f: torch.Tensor, uniforms: torch.Tensor,
                              cfg: C.IPMixConfig, out_dtype: torch.dtype = torch.float32,
                              channels_last_out: bool = False, impl: str = "torch"):
    """Like ``ipmix_views`` but from raw uniforms [B, A, ``tape.uniform_size(cfg)``] (what the
    DALI graph draws): returns (views, tapes [B, A, L]).  The Triton implementation decodes them
    in a kernel, the torch one with ``tape.decode`` in NumPy."""
    if checked_impl(impl) == "triton":
        from . import triton_kernels as TK
        tapes = TK.decode(uniforms.to(x.device), cfg)
    else:
        tapes = torch.from_numpy(T.decode_flat(uniforms.cpu().numpy(), cfg)).to(x.device)
    return ipmix_views(x, f, tapes, cfg, out_dtype, channels_last_out, impl), tapes
