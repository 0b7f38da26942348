"""The readable DALI backend: every IPMix operation as a small function on DataNodes.

Each image op is ``op(image, magnitude) -> image`` on uint8 HWC DataNodes (CPU or GPU), with the
magnitude a per-sample CPU scalar DataNode holding exactly what the official code hands to PIL.
Per-sample op choice uses DALI conditionals (``select``, as ``nvidia.dali.auto_aug`` does), so the
graph shows one node per op; the fused backend (``dali_ipmix.fused``) does the same work in one
kernel.  Both consume the same tapes (``dali_ipmix.tape``).

Debugging entry points: ``run_image_op`` and ``run_mixing_op`` run one op on NumPy images on a
chosen backend and return NumPy.

Fidelity to PIL (measured by tests/test_ops.py on photographs):
- posterize, solarize, invert, mirror, brightness, color, contrast: exact;
- rotate, shear, translate: PIL's bilinear AFFINE emulated (truncation, edge clamp, inside test);
  differences are float rounding at interpolation boundaries (mean abs diff well below 1 level);
- equalize: DALI's ``fn.equalize`` (OpenCV's formula, not PIL's); documented bound in the tests;
- autocontrast, sharpness: PIL's algorithm in float32 (rare off-by-one at rounding boundaries).
"""
from __future__ import annotations

import math

import numpy as np

from . import config as C
from . import noise
from .tape import SF, TapeLayout

# image op name -> its DALI implementation ``fn(image, mag, size)`` (filled by ``image_op_fn``)
DALI_IMAGE_OPS = {}


def image_op_fn(name):
    """Register ``fn(image, mag, size)`` as the DALI implementation of image op ``name``."""
    def deco(fn_):
        DALI_IMAGE_OPS[name] = branch_free(fn_)
        return fn_
    return deco


def branch_free(fn_):
    """``fn_`` kept out of AutoGraph: a graph traced with conditionals on has DALI convert every
    function its definition calls, which dominates graph-build time; a function without branches
    (an op, the tape draw) needs no conversion and stays plain Python."""
    from nvidia.dali.pipeline import do_not_convert
    return do_not_convert(fn_)


def _dali():
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath
    return fn, types, dmath


def _i32(x):
    fn, types, _ = _dali()
    return fn.cast(x, dtype=types.INT32)


def _f32(x):
    fn, types, _ = _dali()
    return fn.cast(x, dtype=types.FLOAT)


def _u8(x):
    """Cast values already integral and in [0, 255] to uint8 (DALI's cast rounds, so callers
    truncate first)."""
    fn, types, _ = _dali()
    return fn.cast(x, dtype=types.UINT8)


def _floor_u8(x):
    _, _, dmath = _dali()
    return _u8(dmath.clamp(dmath.floor(x), 0.0, 255.0))


# ---------------------------------------------------------------------------------------------
# Geometric ops: PIL's AFFINE with bilinear filter = sample the input at M (x+.5, y+.5) - .5 with
# edge-clamped neighbours, black where the point itself falls outside, truncate to uint8.

def _pil_affine(image, matrix):
    fn, types, _ = _dali()
    warped = fn.warp_affine(image, matrix=matrix, interp_type=types.INTERP_LINEAR,
                            dtype=types.FLOAT)                      # no fill_value: edge clamp
    inside = fn.warp_affine(_ones_like(image), matrix=matrix, interp_type=types.INTERP_NN,
                            fill_value=0)
    return _floor_u8(warped * inside)


def _ones_like(image):
    # A uint8 ones image of the same shape and device: (x & 0) + 1 keeps uint8 and the layout.
    fn, types, _ = _dali()
    return fn.cast(image * 0 + 1, dtype=types.UINT8)


def _matrix(*coeffs):
    fn, types, _ = _dali()
    row = [c if not isinstance(c, (int, float)) else _const(float(c)) for c in coeffs]
    return fn.reshape(fn.stack(*row), shape=[2, 3])


def _const(v):
    _, types, _ = _dali()
    return types.Constant(np.float32(v), device="cpu")


@image_op_fn("shear_x")
def shear_x(image, mag, size):
    return _pil_affine(image, _matrix(1.0, mag, 0.0, 0.0, 1.0, 0.0))


@image_op_fn("shear_y")
def shear_y(image, mag, size):
    return _pil_affine(image, _matrix(1.0, 0.0, 0.0, mag, 1.0, 0.0))


@image_op_fn("translate_x")
def translate_x(image, mag, size):
    return _pil_affine(image, _matrix(1.0, 0.0, mag, 0.0, 1.0, 0.0))


@image_op_fn("translate_y")
def translate_y(image, mag, size):
    return _pil_affine(image, _matrix(1.0, 0.0, 0.0, 0.0, 1.0, mag))


@image_op_fn("rotate")
def rotate(image, mag, size):
    # PIL Image.rotate: an affine about the centre with angle -radians(deg).
    _, _, dmath = _dali()
    rad = mag * (-math.pi / 180.0)
    c, s = dmath.cos(rad), dmath.sin(rad)
    cx = cy = size / 2.0
    return _pil_affine(image, _matrix(c, s, c * -cx + s * -cy + cx, -s, c, s * cx - c * cy + cy))


@image_op_fn("mirror")
def mirror(image, mag, size):
    fn, _, _ = _dali()
    return fn.flip(image, horizontal=1)


# ---------------------------------------------------------------------------------------------
# Pointwise ops (exact).

@image_op_fn("invert")
def invert(image, mag, size):
    return _u8(255 - _i32(image))


@image_op_fn("posterize")
def posterize(image, mag, size):
    # x & ~(2^(8 - bits) - 1), the mask as a uint8 so that uint8 & uint8 stays uint8.
    _, _, dmath = _dali()
    mask = _u8(256.0 - dmath.pow(2.0, 8.0 - mag))
    return image & mask


@image_op_fn("solarize")
def solarize(image, mag, size):
    x = _i32(image)
    hit = _i32(x >= _i32(mag))
    return _u8(x + hit * (255 - 2 * x))


@image_op_fn("equalize")
def equalize(image, mag, size):
    fn, _, _ = _dali()
    return fn.equalize(image)


# ---------------------------------------------------------------------------------------------
# ImageEnhance ops: Image.blend(degenerate, image, factor) = trunc(deg + f * (img - deg)).

def _blend(degenerate, image, factor):
    d = _f32(degenerate)
    return _floor_u8(d + factor * (_f32(image) - d))


def _gray(image):
    """PIL's RGB -> L conversion (ITU-R 601-2 luma, integer arithmetic), as int32 [H, W, 1]."""
    x = _i32(image)
    r, g, b = x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


@image_op_fn("brightness")
def brightness(image, mag, size):
    return _floor_u8(_f32(image) * mag)


@image_op_fn("color")
def color(image, mag, size):
    return _blend(_gray(image), image, mag)


@image_op_fn("contrast")
def contrast(image, mag, size):
    fn, _, dmath = _dali()
    mean = fn.reductions.mean(_f32(_gray(image)))
    return _blend(dmath.floor(mean + 0.5), image, mag)


@image_op_fn("sharpness")
def sharpness(image, mag, size):
    # PIL's SMOOTH kernel; PIL keeps the 1-pixel border of the source unfiltered.
    fn, types, _ = _dali()
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
    smooth = fn.filter(_f32(image), types.Constant(kernel), dtype=types.FLOAT)
    smooth = _floor_u8(smooth + 0.5)
    interior = _border_mask(size)
    degenerate = _i32(smooth) * interior + _i32(image) * (1 - interior)
    return _blend(degenerate, image, mag)


def _border_mask(size):
    _, types, _ = _dali()
    m = np.zeros((size, size, 1), np.int32)
    m[1:-1, 1:-1] = 1
    return types.Constant(m, layout="HWC")


@image_op_fn("autocontrast")
def autocontrast(image, mag, size):
    """PIL's ImageOps.autocontrast(image, cutoff): per channel, cut ``cutoff`` % of the pixels at
    each end of the histogram, then stretch [lo, hi] to [0, 255]."""
    fn, types, dmath = _dali()
    x = _i32(image)
    bins = types.Constant(np.arange(256, dtype=np.int32))
    onehot = _i32(fn.expand_dims(x, axes=[3]) == bins)                 # H W C 256
    hist = fn.reductions.sum(onehot, axes=[0, 1])                        # C 256
    upper = types.Constant(np.triu(np.ones((256, 256), np.int32)))      # [i, j] = i <= j
    cum = fn.reductions.sum(fn.expand_dims(hist, axes=[2]) * upper, axes=[1])   # C 256 inclusive
    n = _f32(size * size)
    cut = dmath.floor(n * mag / 100.0)
    total = cum[:, 255:256]
    lo = _f32(fn.reductions.sum(_i32(_f32(cum) <= cut), axes=[1]))
    rcum = _f32(total - cum + hist)                                      # reverse inclusive
    hi = 255.0 - _f32(fn.reductions.sum(_i32(rcum <= cut), axes=[1]))
    ok = _f32(hi > lo)
    scale = ok * 255.0 / dmath.max(hi - lo, 1.0) + (1 - ok)
    offset = -lo * scale * ok
    v = _f32(image) * scale + offset
    return _u8(dmath.clamp(dmath.floor(dmath.max(v, 0.0)), 0.0, 255.0))


C.check_implemented(DALI_IMAGE_OPS, "dali_ipmix.ops (@image_op_fn)")


# ---------------------------------------------------------------------------------------------
# Per-sample op selection (conditionals).

def select(branches, index, *args):
    """Run ``branches[index](*args)`` per sample by bisecting ``index`` with DALI conditionals
    (log2(n) levels, each sample reaches exactly one branch)."""
    if len(branches) == 1:
        return branches[0](*args)
    mid = len(branches) // 2
    if index < mid:
        out = select(branches[:mid], index, *args)
    else:
        out = select(branches[mid:], index - mid, *args)
    return out


def image_op(image, op, mag, cfg: C.IPMixConfig):
    """One image op per sample: ``op`` indexes ``cfg.ops``; ``mag`` the PIL magnitude."""
    branches = [DALI_IMAGE_OPS[name] for name in cfg.ops]
    return select(branches, op, image, mag, cfg.image_size)


# ---------------------------------------------------------------------------------------------
# P-level mixing on whole images; the patch window is a mask.

def _window_mask(top, left, height, width, size):
    _, types, _ = _dali()
    ys = types.Constant(np.arange(size, dtype=np.float32).reshape(size, 1, 1))
    xs = types.Constant(np.arange(size, dtype=np.float32).reshape(1, size, 1))
    inside_y = _i32(ys >= top) * _i32(ys < top + height)
    inside_x = _i32(xs >= left) * _i32(xs < left + width)
    return inside_y * inside_x                                            # H W 1 int32


def _wrap(v, overflow):
    """``mul(255).byte()``: truncate and wrap mod 256 (beyond int32, inf, NaN -> 0), or clamp."""
    _, _, dmath = _dali()
    if overflow == "clamp":
        return _floor_u8(dmath.clamp(v, 0.0, 1.0) * 255.0)
    v = v * 255.0
    ok = _f32(dmath.abs(v) < 2.0 ** 31)                     # False for inf and NaN as well
    v = dmath.clamp(v, -2.0 ** 31, 2.0 ** 31) * ok          # no inf * 0 = NaN below
    trunc = dmath.floor(dmath.abs(v)) * (1.0 - 2.0 * _f32(v < 0.0))
    return _u8(_i32(trunc) & 255)


def _add(p1, p2, s, size, cfg):
    return _wrap(((s["a"] * (p1 * 2.0 - 1.0) + s["b"] * (p2 * 2.0 - 1.0)) + 1.0) / 2.0, cfg.overflow)


def _multiply(p1, p2, s, size, cfg):
    _, _, dmath = _dali()
    out = (dmath.pow(p1 * 2.0, s["a"]) * dmath.pow(dmath.max(p2 * 2.0, C.MULTIPLY_EPS), s["b"])) / 2.0
    return _wrap(out, cfg.overflow)


def _random_mask(s, size, channels):
    fn, types, _ = _dali()
    index = types.Constant(noise.pixel_index(size, size, channels), layout="HWC")
    seed = fn.cast(s["seed"], dtype=types.INT64)
    mask32 = types.Constant(np.int64(noise.MASK32))
    bits = noise.uniform_bits(index, seed, mask32)
    return _f32(bits) * noise.INV_2_24 < s["p"]


def _masked_pick(s, size, channels, x1, x2):
    take1 = _i32(_random_mask(s, size, channels))
    return _u8(_i32(x1) * take1 + _i32(x2) * (1 - take1))


def _random_pixels(p1, p2, s, size, cfg, x1=None, x2=None):
    return _masked_pick(s, size, 1, x1, x2)


def _random_elems(p1, p2, s, size, cfg, x1=None, x2=None):
    return _masked_pick(s, size, 3, x1, x2)


def mixing_op(x1, x2, mix, s, cfg: C.IPMixConfig):
    """One mixing op per sample over the whole image (no window).  ``s`` maps tape field names
    (a, b, p, seed) to per-sample CPU scalars; ``mix`` indexes ``MIXING_OPS``."""
    size = cfg.image_size

    def arith(fn_):
        return lambda x1, x2: fn_(_f32(x1) / 255.0, _f32(x2) / 255.0, s, size, cfg)

    def masked(fn_):
        # x/255*255 round-trips exactly, so mask ops select uint8 values directly.
        return lambda x1, x2: fn_(None, None, s, size, cfg, x1, x2)

    branches = [branch_free(arith(_add)), branch_free(arith(_multiply)),
                branch_free(masked(_random_pixels)), branch_free(masked(_random_elems))]
    return select(branches, mix, x1, x2)


def patch_mix(cur, partner, s, cfg: C.IPMixConfig):
    """The official ``patch_mixing``: the op inside the window, ``cur`` outside."""
    mixed = mixing_op(cur, partner, s["mix"], s, cfg)
    return branch_free(_paste)(cur, mixed, s, cfg.image_size)


def _paste(cur, mixed, s, size):
    inside = _window_mask(s["top"], s["left"], s["height"], s["width"], size)
    return _u8(_i32(mixed) * inside + _i32(cur) * (1 - inside))


# ---------------------------------------------------------------------------------------------
# Chains and views.

def _fields(step):
    return {name: step[i] for name, i in SF.items()}


def chain_step(cur, x, f, step, cfg: C.IPMixConfig):
    s = _fields(step)
    if s["active_img"] > 0:
        out = image_op(cur, s["op"], s["mag"], cfg)
    elif s["active_p"] > 0:
        if cfg.self_mix and s["self_mix"] > 0:
            partner = image_op(x, s["self_op"], s["self_mag"], cfg)
        else:
            partner = f
        out = patch_mix(cur, partner, s, cfg)
    else:
        out = cur
    return out


def chains(x, f, tape_node, cfg: C.IPMixConfig):
    """The k chain results (uint8 HWC DataNodes) of one tape (a CPU DataNode [L])."""
    layout = TapeLayout(cfg.k, cfg.t)
    results = []
    for i in range(cfg.k):
        cur = x
        for j in range(cfg.t):
            cur = chain_step(cur, x, f, tape_node[layout.step_slice(i, j)], cfg)
        results.append(cur)
    return results


def normalize(image, cfg: C.IPMixConfig, dtype: str = "float"):
    """uint8 HWC -> normalised CHW, float32 (``dtype="float"``) or float16 (``"float16"``)."""
    fn, types, _ = _dali()
    return fn.crop_mirror_normalize(image, dtype=types.FLOAT16 if dtype == "float16" else types.FLOAT,
                                    output_layout="CHW",
                                    mean=[255 * m for m in cfg.mean], std=[255 * s for s in cfg.std])


def ipmix_view(x, f, tape_node, cfg: C.IPMixConfig):
    """One IPMix view: (1 - m) x + m sum_i w_i chain_i on [0, 1] floats, normalised once."""
    layout = TapeLayout(cfg.k, cfg.t)
    acc = None
    for i, cur in enumerate(chains(x, f, tape_node, cfg)):
        term = _f32(cur) * tape_node[layout.chain_field(i, "weight")]
        acc = term if acc is None else acc + term
    m = tape_node[layout.SKIP]
    mixed = _f32(x) * (1.0 - m) + acc * m                     # in [0, 255]
    return _normalize_float(mixed, cfg)


def _normalize_float(img, cfg):
    fn, types, _ = _dali()
    return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[255 * m for m in cfg.mean], std=[255 * s for s in cfg.std])


def ipmix_views(x, f, tapes, cfg: C.IPMixConfig):
    """All views of a sample stacked [V, 3, H, W]: clean + one per tape (JSD), or one view."""
    fn, _, _ = _dali()
    views = ([normalize(x, cfg)] if cfg.jsd else []) + [ipmix_view(x, f, t, cfg) for t in tapes]
    return fn.stack(*views, axis=0) if len(views) > 1 else fn.expand_dims(views[0], axes=[0])


# ---------------------------------------------------------------------------------------------
# Debugging entry points.

def _run_graph(graph, inputs, device, num_threads=2):
    """Run ``graph(*input_nodes) -> node`` once on a batch of NumPy inputs; NumPy out."""
    from nvidia.dali import fn, pipeline_def
    batch = len(inputs[0])

    @pipeline_def(batch_size=batch, num_threads=num_threads, device_id=0 if device == "gpu" else None,
                  enable_conditionals=True, exec_dynamic=True)
    def pipe():
        nodes = []
        for arr in inputs:
            arr = list(arr)
            is_image = arr[0].ndim == 3
            node = fn.external_source(source=_constant_source(arr), batch=True,
                                      layout="HWC" if is_image else "", device="cpu")
            nodes.append(node.gpu() if is_image and device == "gpu" else node)
        return graph(*nodes)

    p = pipe()
    p.build()
    (out,) = p.run()
    out = out.as_cpu() if device == "gpu" else out
    return np.stack([np.asarray(out.at(i)) for i in range(batch)])


def _constant_source(batch):
    # A zero-argument callable: DALI passes an iteration index to callables that take one.
    return lambda: batch


def _check_device(device):
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")


def _images_batch(images, what="images"):
    arr = [np.ascontiguousarray(im, dtype=np.uint8) for im in images]
    if not arr or any(a.ndim != 3 or a.shape[2] != 3 for a in arr):
        raise ValueError(f"{what} must be a non-empty batch of HWC uint8 RGB images")
    if len({a.shape for a in arr}) != 1 or arr[0].shape[0] != arr[0].shape[1]:
        raise ValueError(f"{what} must be square and all the same size (IPMix works on crops)")
    return arr


def run_image_op(name: str, images, magnitude=None, device: str = "cpu") -> np.ndarray:
    """Run image op ``name`` on a batch of square HWC uint8 images with the DALI backend.

    ``magnitude`` is what the official code hands to PIL (degrees for rotate, the AFFINE
    coefficient for shear, pixels for translate, bits kept for posterize, threshold for
    solarize, cutoff % for autocontrast, factor for the enhance ops; ``None`` for equalize,
    mirror, invert).  A scalar or one value per image.
    """
    _check_device(device)
    C.op_index(name)                                    # one-line error for unknown names
    imgs = _images_batch(images)
    if magnitude is None:
        magnitude = C.IDENTITY_MAGNITUDE.get(name, 0.0)
    mags = np.broadcast_to(np.asarray(magnitude, np.float32), (len(imgs),))
    size = imgs[0].shape[0]
    return _run_graph(lambda x, m: DALI_IMAGE_OPS[name](x, m, size),
                      [imgs, [np.asarray(v, np.float32) for v in mags]], device)


def run_mixing_op(name: str, images, partners, a=1.0, b=0.0, p=0.5, seed=0, window=None,
                  overflow="wrap", device: str = "cpu") -> np.ndarray:
    """Run mixing op ``name`` (add, multiply, random_pixels, random_elems) of ``images`` with
    ``partners`` inside ``window = (top, left, height, width)`` (None: whole image)."""
    _check_device(device)
    mix = C.mixing_index(name)
    x1, x2 = _images_batch(images), _images_batch(partners, "partners")
    size = x1[0].shape[0]
    n = len(x1)
    window = (0, 0, size, size) if window is None else window
    cfg = C.IPMixConfig(image_size=size, patch_sizes=(size,), overflow=overflow)
    rec = np.zeros((n, len(SF)), np.float32)
    rec[:, SF["mix"]] = mix
    for key, v in zip(("a", "b", "p", "seed", "top", "left", "height", "width"),
                      (a, b, p, seed) + tuple(window)):
        rec[:, SF[key]] = np.broadcast_to(np.asarray(v, np.float32), (n,))

    def graph(x1n, x2n, r):
        s = _fields(r)
        return patch_mix(x1n, x2n, s, cfg)

    return _run_graph(graph, [x1, x2, list(rec)], device)
