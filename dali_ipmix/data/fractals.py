"""Procedural IPMix mixing set: IFS fractals and escape-time orbit-trap fractals, generated in place
of the downloaded fractal set the official code mixes with (`dali-ipmix fractals`, README "More tools").

IFS fractals follow Anderson & Farrell, "Improving Fractal Pre-training" (catalys1/fractal-pretraining,
``fractals/ifs.py``): a random contractive system whose singular values obey the "sigma-factor"
constraint, a chaos game, a hit-density render over the bounding box, an HSV colouring and a random
coloured noise background.  Orbit-trap fractals iterate z <- z^2 + c (Mandelbrot or Julia) and colour
each pixel by its smooth escape count and its closest approach to a trap shape.

Everything is vectorised NumPy (the chaos game runs many independent walkers side by side; the
escape-time loop updates all still-bounded pixels at once).  Image ``i`` of a run draws every random
number from ``np.random.default_rng([seed, i])``, so a seed reproduces byte-identical files
whatever the number of worker processes.
"""
from __future__ import annotations

import argparse
import functools
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from dali_ipmix.data._io import (contact_sheet, pool_map, prepare_out_dir, resolve_jobs, smooth_noise,
                                 staged, write_jpeg)
from dali_ipmix.errors import UserError

# --- run layout ---------------------------------------------------------------------------------
KINDS = ("ifs", "orbit")  # sub-folders of the output folder, in generation order
DEFAULT_SIZE = 256
DEFAULT_IFS_RATIO = 0.75
PREVIEW_TILES = 32
JPEG_SUBSAMPLING = "4:4:4"  # IFS dust is one-pixel colour detail; 4:2:0 would smear its hues
MAX_TRIES = 200  # resampling bound; acceptance is >50%, so hitting it means a bug, not bad luck

# --- IFS (Anderson & Farrell) -------------------------------------------------------------------
IFS_MAPS = (2, 7)          # n ~ U{2..7}
IFS_POINTS = 100_000       # chaos-game points per image
IFS_WALKERS = 2048         # independent chaos games run side by side
IFS_BURN_IN = 8            # steps discarded so the walkers, all started at one point, spread out
IFS_MARGIN = 0.04          # empty border around the bounding box, as a fraction of the side
IFS_MIN_SAT, IFS_MIN_VAL = 0.3, 0.5  # HSV saturation/value ranges [min, 1] of the fractal colour
MIN_CONTRAST = 60.0        # RGB distance fractal vs. background behind it; else redraw the background
BACKGROUND_TRIES = 8
BACKGROUND_RES = 64        # the plasma background is drawn at this size, then upsampled

# Non-degeneracy bounds on a rendered density (see ``density_stats``).  Spreads are standard
# deviations of the occupied cells' coordinates in units of the image side (0.289 for a full square).
MIN_COVERAGE = 0.03        # below: blank or dust
MAX_COVERAGE = 0.70        # above: a filled blob, little structure and little background
MIN_SPREAD_MINOR = 0.06    # below: line-like
MIN_SPREAD_MAJOR = 0.12    # below: point-like

# --- orbit traps ----------------------------------------------------------------------------------
ESCAPE_R2 = 1.0e4          # a large bailout radius keeps the smooth escape count smooth
MANDEL_WINDOW = (-2.2, 0.8, -1.5, 1.5)  # region scanned for boundary points (re_lo, re_hi, im_lo, im_hi)
BOUNDARY_GRID = 160        # resolution of that scan
BOUNDARY_ITERS = 80
MANDEL_WIDTH = (0.015, 3.2)  # view width range, sampled log-uniformly
JULIA_WIDTH = (0.6, 3.4)
ORBIT_BASE_ITERS = 64
TRAPS = ("point", "line", "circle", "cross")

# Non-degeneracy bounds on a final picture (both kinds): grey-level spread and share of textured pixels.
MIN_LUMA_STD = 12.0
MIN_EDGE_FRACTION = 0.04   # share of pixels whose local grey gradient exceeds EDGE_STEP
MAX_EDGE_FRACTION = 0.97   # above: pure pixel noise (aliased deep zoom)
EDGE_STEP = 6.0
MIN_COLOURS = 24           # distinct colours after quantising each channel to 4 bits


# ==================================================================================================
# IFS
def sample_svs(rng: np.random.Generator, n: int, alpha: float) -> np.ndarray:
    """``n`` pairs (s1, s2) with 0 <= s2 <= s1 <= 1 and sum(s1 + 2 s2) == alpha, drawn pair by pair.

    Each pair's contribution c = s1 + 2 s2 must leave a remainder the later pairs can still reach,
    i.e. 0 <= rest - c <= 3 * (pairs left); the bounds below are that condition solved for s1, then s2.
    """
    if not 0.0 <= alpha <= 3.0 * n:
        raise ValueError(f"alpha={alpha} outside [0, {3 * n}]")
    out = np.empty((n, 2))
    rest = float(alpha)
    for i in range(n - 1):
        later = 3.0 * (n - 1 - i)  # the most the remaining pairs can add
        s1 = rng.uniform(max(0.0, (rest - later) / 3.0), min(1.0, rest))
        s2 = rng.uniform(max(0.0, (rest - later - s1) / 2.0), min(s1, (rest - s1) / 2.0))
        out[i] = s1, s2
        rest -= s1 + 2.0 * s2
    # The last pair must hit the remainder exactly: s1 = rest - 2 s2 with s2 <= s1 <= 1.
    s2 = rng.uniform(max(0.0, (rest - 1.0) / 2.0), rest / 3.0)
    out[-1] = rest - 2.0 * s2, s2
    return out


def _random_orthogonal(rng: np.random.Generator, k: int) -> np.ndarray:
    """k random 2x2 orthogonal matrices: a rotation by U(-pi, pi) times a random +-1 axis reflection."""
    angle = rng.uniform(-np.pi, np.pi, k)
    c, s = np.cos(angle), np.sin(angle)
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    flips = np.where(rng.random((k, 2)) < 0.5, -1.0, 1.0)
    return rot * flips[:, None, :]  # scales the columns: rot @ diag(flips)


def sample_system(rng: np.random.Generator, n: Optional[int] = None) -> np.ndarray:
    """A random contractive IFS: (n, 2, 3) array of affine maps [A_i | b_i], A_i = U_i diag(s1, s2) V_i."""
    if n is None:
        n = int(rng.integers(IFS_MAPS[0], IFS_MAPS[1] + 1))
    uv = _random_orthogonal(rng, 2 * n)
    u, v = uv[:n], uv[n:]
    alpha = rng.uniform((5 + n) / 2.0, (6 + n) / 2.0)  # the "sigma factor"
    s = sample_svs(rng, n, alpha)
    system = np.empty((n, 2, 3))
    system[:, :, :2] = (u * s[:, None, :]) @ v
    system[:, :, 2] = rng.uniform(-1.0, 1.0, (n, 2))
    return system


def _fixed_point(system: np.ndarray) -> np.ndarray:
    """Fixed point of map 0, which lies on the attractor, so no walker starts off it."""
    a, b = system[0, :, :2], system[0, :, 2]
    try:
        return np.linalg.solve(np.eye(2) - a, b)
    except np.linalg.LinAlgError:  # s1 == 1 exactly: any point converges anyway
        return b.copy()


def chaos_game(system: np.ndarray, rng: np.random.Generator, n_points: int = IFS_POINTS,
               walkers: int = IFS_WALKERS) -> np.ndarray:
    """About ``n_points`` attractor points, (2, N) rows x and y, from ``walkers`` chaos games run in lockstep.

    Map i is chosen with probability proportional to |det A_i| (its area scale), which spreads
    the points evenly over the attractor.
    """
    n = system.shape[0]
    a = system[:, :, :2]
    det = np.abs(a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0])
    prob = det / det.sum() if det.sum() > 0 else np.full(n, 1.0 / n)
    steps = IFS_BURN_IN + -(-n_points // walkers)
    choice = np.minimum(np.searchsorted(np.cumsum(prob), rng.random((steps, walkers))), n - 1)
    # One gather for all steps; rows are the 6 map coefficients, each (steps, walkers) contiguous.
    coef = system.reshape(n, 6).T[:, choice]
    start = _fixed_point(system)
    x = np.full(walkers, start[0])
    y = np.full(walkers, start[1])
    out = np.empty((2, steps - IFS_BURN_IN, walkers))
    for t in range(steps):
        x, y = (coef[0, t] * x + coef[1, t] * y + coef[2, t],
                coef[3, t] * x + coef[4, t] * y + coef[5, t])
        if t >= IFS_BURN_IN:
            out[0, t - IFS_BURN_IN] = x
            out[1, t - IFS_BURN_IN] = y
    return out.reshape(2, -1)


def render_density(points: np.ndarray, size: int, margin: float = IFS_MARGIN) -> np.ndarray:
    """Hit counts of ``points`` (2, N) on a size x size grid spanning their bounding box, divided by the max.

    Like the reference, x and y are stretched independently to fill the frame.
    """
    if not np.isfinite(points.sum()):  # cannot happen for a contractive system; cheap to guard
        points = points[:, np.isfinite(points).all(axis=0)]
    if points.shape[1] == 0:
        return np.zeros((size, size), np.float32)
    inner = size * (1.0 - 2.0 * margin)
    cells = []
    for axis in points:  # (x, y): row-wise reductions are much faster than column-wise ones
        lo, hi = axis.min(), axis.max()
        scale = (inner - 1) / (hi - lo) if hi > lo else 0.0
        c = ((axis - lo) * scale + size * margin).astype(np.int64)
        cells.append(np.clip(c, 0, size - 1, out=c))
    counts = np.bincount(cells[1] * size + cells[0], minlength=size * size)
    density = counts.reshape(size, size).astype(np.float32)
    return density / density.max()


def density_stats(density: np.ndarray) -> Dict[str, float]:
    """Coverage (share of occupied cells) and spread (sqrt of the eigenvalues of the covariance of the
    occupied cells' coordinates, in units of the side) of a rendered density."""
    occupied = np.argwhere(density > 0)
    h, w = density.shape
    coverage = len(occupied) / float(h * w)
    if len(occupied) < 2:
        return {"coverage": coverage, "spread_major": 0.0, "spread_minor": 0.0}
    # Moments by hand: np.cov is a matrix product, i.e. multi-threaded BLAS in every worker process.
    r = occupied[:, 0] / float(h)
    c = occupied[:, 1] / float(w)
    r, c = r - r.mean(), c - c.mean()
    vrr, vcc, vrc = (r * r).mean(), (c * c).mean(), (r * c).mean()
    half_gap = math.sqrt(max(0.0, 0.25 * (vrr - vcc) ** 2 + vrc * vrc))
    mid = 0.5 * (vrr + vcc)
    major, minor = math.sqrt(max(mid + half_gap, 0.0)), math.sqrt(max(mid - half_gap, 0.0))
    return {"coverage": coverage, "spread_major": float(major), "spread_minor": float(minor)}


def density_ok(density: np.ndarray) -> bool:
    """False for blank, filled (one flat colour), line-like or point-like renders."""
    st = density_stats(density)
    return (MIN_COVERAGE <= st["coverage"] <= MAX_COVERAGE
            and st["spread_minor"] >= MIN_SPREAD_MINOR
            and st["spread_major"] >= MIN_SPREAD_MAJOR)


def picture_ok(rgb: np.ndarray) -> bool:
    """False for a finished picture that is flat, a single colour, or pure pixel noise."""
    f = rgb.astype(np.float32)
    luma = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]  # not a matmul: no BLAS threads
    if luma.std() < MIN_LUMA_STD:
        return False
    step = np.maximum(np.abs(np.diff(luma, axis=0))[:, :-1], np.abs(np.diff(luma, axis=1))[:-1, :])
    edges = float((step > EDGE_STEP).mean())
    if not MIN_EDGE_FRACTION <= edges <= MAX_EDGE_FRACTION:
        return False
    q = (rgb >> 4).astype(np.int32)
    return len(np.unique(q[..., 0] * 256 + q[..., 1] * 16 + q[..., 2])) >= MIN_COLOURS


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all inputs in [0, 1] (hue wraps); returns float (..., 3) in [0, 1]."""
    h6 = (np.asarray(h, np.float64) % 1.0) * 6.0
    s = np.asarray(s, np.float64)
    v = np.asarray(v, np.float64)
    k = np.stack([(5.0 + h6) % 6.0, (3.0 + h6) % 6.0, (1.0 + h6) % 6.0], -1)
    return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def colorize(density: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """HSV colouring of the reference: hue byte = (gray*255 + h0) mod 256, one saturation and value
    per image.  Returns (uint8 RGB, mask of occupied cells)."""
    h0 = rng.uniform(0.0, 255.0)
    sat = rng.uniform(IFS_MIN_SAT, 1.0)
    val = rng.uniform(IFS_MIN_VAL, 1.0)
    lut = np.rint(hsv_to_rgb(np.arange(256) / 256.0, np.full(256, sat), np.full(256, val)) * 255.0)
    hue = (density * 255.0 + h0).astype(np.int64) % 256
    return lut.astype(np.uint8)[hue], density > 0


def noise_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random coloured plasma: value noise through a random HSV ramp, plus a little per-channel tint.

    The plasma is smooth, so it is coloured at BACKGROUND_RES and upsampled: a fraction of the cost.
    """
    res = min(size, BACKGROUND_RES)
    n = smooth_noise(rng, res, res, channels=3)
    h0, h_span = rng.uniform(0.0, 1.0), rng.uniform(0.1, 0.8)
    sat = rng.uniform(0.2, 0.9)
    v_lo, v_hi = np.sort(rng.uniform(0.05, 0.9, 2))
    rgb = hsv_to_rgb(h0 + h_span * n[..., 0], np.full(n.shape[:2], sat), v_lo + (v_hi - v_lo) * n[..., 1])
    rgb += 0.12 * (n[..., 2:3] - 0.5)
    small = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if res == size:
        return small
    return np.asarray(Image.fromarray(small, "RGB").resize((size, size), Image.BICUBIC)).copy()


def _contrast(fg: np.ndarray, bg: np.ndarray, mask: np.ndarray) -> float:
    """RGB distance between the mean fractal colour and the mean background colour behind it."""
    return float(np.linalg.norm(fg[mask].mean(axis=0) - bg[mask].mean(axis=0, dtype=np.float64)))


def render_ifs(rng: np.random.Generator, size: int = DEFAULT_SIZE,
               return_density: bool = False):
    """One IFS fractal, uint8 (size, size, 3); resamples the system until the render is non-degenerate.

    With ``return_density`` also returns the accepted density (for checks and tests).
    """
    for _ in range(MAX_TRIES):
        system = sample_system(rng)
        density = render_density(chaos_game(system, rng), size)
        if not density_ok(density):
            continue
        fg, mask = colorize(density, rng)
        for _ in range(BACKGROUND_TRIES):
            rgb = noise_background(rng, size)
            if _contrast(fg, rgb, mask) >= MIN_CONTRAST:
                break
        rgb[mask] = fg[mask]
        if picture_ok(rgb):
            return (rgb, density) if return_density else rgb
    raise RuntimeError(f"no acceptable IFS fractal in {MAX_TRIES} tries")


# ==================================================================================================
# Orbit traps
def _trap_distance(kind: str, params: Dict[str, float], zr: np.ndarray, zi: np.ndarray) -> np.ndarray:
    dx, dy = zr - params["px"], zi - params["py"]
    if kind == "point":
        return np.sqrt(dx * dx + dy * dy)
    across = np.abs(dx * params["sin"] - dy * params["cos"])  # distance to the line through p
    if kind == "line":
        return across
    if kind == "cross":
        along = np.abs(dx * params["cos"] + dy * params["sin"])
        return np.minimum(across, along)
    return np.abs(np.sqrt(dx * dx + dy * dy) - params["radius"])  # circle


def escape_time(cr: np.ndarray, ci: np.ndarray, zr: np.ndarray, zi: np.ndarray, max_iter: int,
                trap: str, trap_params: Dict[str, float]) -> Tuple[np.ndarray, np.ndarray]:
    """Iterate z <- z^2 + c elementwise; returns (smooth escape count, NaN where bounded; min trap distance).

    Only still-bounded points are iterated: escaped ones are dropped from the working arrays, which is
    what keeps the loop cheap (most of a typical view escapes within a few steps).
    """
    shape = cr.shape
    cr, ci = cr.ravel().astype(np.float32), ci.ravel().astype(np.float32)
    zr, zi = zr.ravel().astype(np.float32), zi.ravel().astype(np.float32)
    count = np.full(cr.size, np.nan, np.float32)
    dmin = np.full(cr.size, np.inf, np.float32)
    idx = np.arange(cr.size)
    dm = dmin.copy()
    for it in range(max_iter):
        zr2, zi2 = zr * zr, zi * zi
        zi = 2.0 * zr * zi + ci
        zr = zr2 - zi2 + cr
        np.minimum(dm, _trap_distance(trap, trap_params, zr, zi), out=dm)
        mag = zr * zr + zi * zi
        esc = mag > ESCAPE_R2
        if esc.any():
            e = idx[esc]
            # Smooth count: subtracts how far past the bailout the last step overshot.
            count[e] = it + 1.0 - np.log2(np.log(mag[esc]) * 0.5)
            dmin[e] = dm[esc]
            keep = ~esc
            idx, zr, zi, cr, ci, dm = idx[keep], zr[keep], zi[keep], cr[keep], ci[keep], dm[keep]
            if idx.size == 0:
                break
    dmin[idx] = dm
    return count.reshape(shape), dmin.reshape(shape)


@functools.lru_cache(maxsize=1)
def _mandelbrot_boundary() -> np.ndarray:
    """Points just outside the Mandelbrot set (escape only after several steps): views and Julia
    parameters centred there show structure instead of a flat inside or outside."""
    re = np.linspace(MANDEL_WINDOW[0], MANDEL_WINDOW[1], BOUNDARY_GRID)
    im = np.linspace(MANDEL_WINDOW[2], MANDEL_WINDOW[3], BOUNDARY_GRID)
    cr, ci = np.meshgrid(re, im)
    zeros = np.zeros_like(cr)
    count, _ = escape_time(cr, ci, zeros, zeros, BOUNDARY_ITERS, "point", {"px": 0.0, "py": 0.0})
    near = np.isfinite(count) & (count >= 8)
    return np.stack([cr[near], ci[near]], -1).astype(np.float64)


def _cosine_palette(rng: np.random.Generator):
    """A random smooth cyclic palette t -> RGB in [0, 1] (a + b cos(2 pi (c t + d)) per channel)."""
    a = rng.uniform(0.35, 0.65, 3)
    b = rng.uniform(0.25, 0.5, 3)
    c = rng.choice([0.5, 1.0, 1.0, 2.0], 3)
    d = rng.uniform(0.0, 1.0, 3)
    return lambda t: np.clip(a + b * np.cos(2.0 * np.pi * (c * t[..., None] + d)), 0.0, 1.0)


def _sample_view(rng: np.random.Generator) -> Dict:
    """Random Mandelbrot or Julia view: centre, width, rotation, iteration budget, c (Julia)."""
    boundary = _mandelbrot_boundary()
    cell = (MANDEL_WINDOW[1] - MANDEL_WINDOW[0]) / BOUNDARY_GRID
    pick = boundary[rng.integers(len(boundary))] + rng.uniform(-0.5, 0.5, 2) * cell
    view = {"julia": bool(rng.random() < 0.5), "angle": rng.uniform(0.0, 2.0 * np.pi)}
    if view["julia"]:
        view["c"] = pick
        view["width"] = math.exp(rng.uniform(*np.log(JULIA_WIDTH)))
        view["centre"] = rng.uniform(-0.5, 0.5, 2)
        view["iters"] = ORBIT_BASE_ITERS + 32
    else:
        width = math.exp(rng.uniform(*np.log(MANDEL_WIDTH)))
        # Wide views drift towards the whole set so they do not show mostly empty plane.
        pull = min(1.0, max(0.0, (width - 0.5) / 2.5))
        view["centre"] = (1.0 - pull) * pick + pull * np.array([-0.6, 0.0])
        view["width"] = width
        view["iters"] = int(ORBIT_BASE_ITERS + 40 * math.log10(MANDEL_WIDTH[1] / width))
    return view


def _sample_trap(rng: np.random.Generator) -> Tuple[str, Dict[str, float]]:
    kind = TRAPS[rng.integers(len(TRAPS))]
    r = math.sqrt(rng.uniform(0.0, 1.0))
    phi, theta = rng.uniform(0.0, 2.0 * np.pi, 2)
    return kind, {"px": r * math.cos(phi), "py": r * math.sin(phi), "cos": math.cos(theta),
                  "sin": math.sin(theta), "radius": rng.uniform(0.2, 1.0)}


def _orbit_colours(count: np.ndarray, dmin: np.ndarray, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Blend a smooth-escape band pattern and a trap glow through a random palette, uint8 RGB."""
    palette = _cosine_palette(rng)
    bounded = ~np.isfinite(count)
    esc = np.where(bounded, float(iters), np.nan_to_num(count, nan=0.0))
    glow_scale = math.exp(rng.uniform(math.log(0.02), math.log(0.4)))
    glow = np.exp(-np.minimum(dmin, 1e3) / glow_scale)        # 1 on the trap, 0 far away
    bands = rng.uniform(1.5, 6.0) * np.log1p(np.maximum(esc, 0.0)) / math.log1p(iters)
    w_trap = rng.uniform(0.3, 1.0)
    t = bands + w_trap * glow + rng.uniform(0.0, 1.0)
    rgb = palette(t)
    shade = rng.uniform(0.2, 0.6)                               # the trap glow also lights the picture
    rgb *= (1.0 - shade) + shade * glow[..., None]
    inside = rng.uniform(0.0, 0.3)                              # bounded points: darker, trap-coloured
    rgb[bounded] = palette(w_trap * glow[bounded] + inside) * (0.25 + 0.75 * glow[bounded, None])
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def render_orbit_trap(rng: np.random.Generator, size: int = DEFAULT_SIZE) -> np.ndarray:
    """One orbit-trap Mandelbrot/Julia picture, uint8 (size, size, 3); resamples flat or noisy views."""
    grid = (np.arange(size) + 0.5) / size - 0.5
    gx, gy = np.meshgrid(grid, -grid)
    for _ in range(MAX_TRIES):
        view = _sample_view(rng)
        cos, sin = math.cos(view["angle"]), math.sin(view["angle"])
        re = view["centre"][0] + view["width"] * (cos * gx - sin * gy)
        im = view["centre"][1] + view["width"] * (sin * gx + cos * gy)
        trap, trap_params = _sample_trap(rng)
        if view["julia"]:
            cr, ci = np.full_like(re, view["c"][0]), np.full_like(re, view["c"][1])
            count, dmin = escape_time(cr, ci, re, im, view["iters"], trap, trap_params)
        else:
            zeros = np.zeros_like(re)
            count, dmin = escape_time(re, im, zeros, zeros, view["iters"], trap, trap_params)
        rgb = _orbit_colours(count, dmin, view["iters"], rng)
        if picture_ok(rgb):
            return rgb
    raise RuntimeError(f"no acceptable orbit-trap view in {MAX_TRIES} tries")


# ==================================================================================================
# Data set
def split_counts(count: int, ifs_ratio: float) -> Tuple[int, int]:
    """(IFS, orbit-trap) image counts of a run."""
    n_ifs = int(round(count * ifs_ratio))
    return n_ifs, count - n_ifs


def fractal_path(out_dir: Path, index: int, count: int, ifs_ratio: float) -> Path:
    """Where image ``index`` of a run goes: the first IFS-share of indices are IFS, the rest orbit traps."""
    n_ifs, _ = split_counts(count, ifs_ratio)
    digits = max(5, len(str(max(count - 1, 0))))
    kind, j = (KINDS[0], index) if index < n_ifs else (KINDS[1], index - n_ifs)
    return Path(out_dir) / kind / f"{j:0{digits}d}.jpg"


def render_fractal(index: int, count: int, size: int = DEFAULT_SIZE, seed: int = 0,
                   ifs_ratio: float = DEFAULT_IFS_RATIO) -> np.ndarray:
    """Picture ``index`` of a run of ``count``, from its own generator ``default_rng([seed, index])``."""
    rng = np.random.default_rng([seed, index])
    n_ifs, _ = split_counts(count, ifs_ratio)
    return render_ifs(rng, size) if index < n_ifs else render_orbit_trap(rng, size)


def _write_one(index: int, out_dir: str, count: int, size: int, seed: int, ifs_ratio: float) -> str:
    path = fractal_path(Path(out_dir), index, count, ifs_ratio)
    write_jpeg(path, render_fractal(index, count, size, seed, ifs_ratio), subsampling=JPEG_SUBSAMPLING)
    return str(path)


MAX_SIZE = 4096    # each float64 work array of a 4096 px picture is 128 MiB, per worker


def _check_args(count: int, size: int, seed: int, ifs_ratio: float) -> None:
    if count < 1:
        raise UserError(f"--count must be >= 1, got {count}")
    if not 32 <= size <= MAX_SIZE:
        raise UserError(f"--size must be in 32..{MAX_SIZE} px, got {size}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if not 0.0 <= ifs_ratio <= 1.0:
        raise UserError(f"--ifs-ratio must lie in [0, 1], got {ifs_ratio}")


def generate_fractals(out_dir, count: int, size: int = DEFAULT_SIZE, seed: int = 0,
                      ifs_ratio: float = DEFAULT_IFS_RATIO, jobs: Optional[int] = None,
                      overwrite: bool = False, preview=None) -> List[str]:
    """Write ``count`` fractals as ``out_dir/ifs/NNNNN.jpg`` and ``out_dir/orbit/NNNNN.jpg``.

    ``overwrite`` replaces only the ``ifs`` and ``orbit`` sub-folders of a non-empty ``out_dir``
    (see ``prepare_out_dir``), and only once the whole set is written (``staged``): an interrupted
    run leaves ``out_dir`` as it was.  ``preview``: optional PNG contact sheet of a few images of
    each kind.  Returns the written paths in index order.
    """
    _check_args(count, size, seed, ifs_ratio)
    out = prepare_out_dir(out_dir, overwrite)
    n_ifs, n_orbit = split_counts(count, ifs_ratio)
    with staged(out, KINDS) as stage:
        for kind, n in zip(KINDS, (n_ifs, n_orbit)):
            if n:
                (stage / kind).mkdir()
        work = functools.partial(_write_one, out_dir=str(stage), count=count, size=size, seed=seed,
                                 ifs_ratio=ifs_ratio)
        pool_map(work, range(count), jobs, progress="fractals")
    paths = [str(fractal_path(out, i, count, ifs_ratio)) for i in range(count)]
    if preview and paths:
        n_prev_ifs = min(n_ifs, max(PREVIEW_TILES - n_orbit, round(PREVIEW_TILES * ifs_ratio)))
        picks = paths[:n_prev_ifs] + paths[n_ifs:n_ifs + PREVIEW_TILES - n_prev_ifs]
        contact_sheet(picks, preview, cols=8, tile=128)
    return paths


# ==================================================================================================
# CLI
def _run(args: argparse.Namespace) -> int:
    import sys
    from dali_ipmix.outputs import check_output_file
    start = time.perf_counter()
    _check_args(args.count, args.size, args.seed, args.ifs_ratio)
    resolve_jobs(args.jobs)
    if args.preview:
        if Path(args.preview).resolve().is_relative_to(Path(args.out).resolve()):
            raise UserError(f"--preview {args.preview} is inside --out {args.out}: the readers would "
                            f"take the sheet for a mixing picture; put it outside --out")
        check_output_file(args.preview, "--preview", args.overwrite)
    try:
        paths = generate_fractals(args.out, args.count, size=args.size, seed=args.seed,
                                  ifs_ratio=args.ifs_ratio, jobs=args.jobs, overwrite=args.overwrite,
                                  preview=args.preview)
    except KeyboardInterrupt:
        print(f"fractals: interrupted; {args.out} is as it was before (no partial set)",
              file=sys.stderr, flush=True)
        return 130
    took = time.perf_counter() - start
    n_ifs, n_orbit = split_counts(args.count, args.ifs_ratio)
    print(f"fractals: {len(paths)} images ({n_ifs} ifs, {n_orbit} orbit) at {args.size}px in {took:.1f} s "
          f"({len(paths) / max(took, 1e-9):.1f} img/s, {resolve_jobs(args.jobs)} jobs) -> {args.out}"
          + (f"; preview {args.preview}" if args.preview else ""))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fractals", help="generate the procedural IPMix mixing set (IFS + orbit-trap fractals)",
        description="Write IFS fractals to OUT/ifs/ and orbit-trap Mandelbrot/Julia fractals to OUT/orbit/ "
                    "as baseline JPEGs. The same --seed gives byte-identical files for any --jobs.")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent unless --overwrite)")
    p.add_argument("--count", type=int, required=True, help="number of images (the paper's set: 13000)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="side in pixels (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--ifs-ratio", type=float, default=DEFAULT_IFS_RATIO,
                   help="share of IFS fractals, the rest are orbit traps (default %(default)s)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per CPU)")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse a non-empty --out, replacing its ifs/ and orbit/ sub-folders (other files "
                        "stay), and replace an existing --preview file")
    p.add_argument("--preview", default=None, metavar="PNG",
                   help="also write a contact sheet of a few images here (put it outside --out)")
    p.set_defaults(func=_run)
