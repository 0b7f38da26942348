"""A small ImageNet-like labelled image set for demos and tests: ``OUT/{train,val}/<class>/NNNNN.jpg``.

Each class is one silhouette (circle, triangle, star, ...) filled with one texture (plain, stripes,
dots, checker), drawn at a random position, scale and rotation over a random textured background.
Colours are drawn independently of the class, so a model has to use shape and texture.  Pictures
have random sizes (300-500 px a side, so random aspect ratios) and photo-like JPEG sizes (grain and
multi-scale noise, not flat fills).  That is the ``photo`` style; the ``demo`` style (the built-in
demo of ``train.py``, which trains at 32 px) draws ten one-colour silhouettes that stay distinct at
that resolution, large, within 45 degrees of upright, on calmer backgrounds and small pictures
(96-128 px a side: quick to draw and to decode).  Picture (seed, split, class, index) draws every random number
from ``np.random.default_rng([seed, split, class, index])``: reproducible for any number of workers.
"""
from __future__ import annotations

import argparse
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dali_ipmix.data._io import contact_sheet, pool_map, prepare_out_dir, resolve_jobs, smooth_noise, write_jpeg
from dali_ipmix.errors import UserError

SPLITS = ("train", "val")  # sub-folders of the output folder; the index is the split's rng stream id
SHAPES = ("circle", "triangle", "square", "star", "ring", "cross", "hexagon", "crescent", "arrow",
          "heart", "tee")
TEXTURES = ("plain", "stripes", "dots", "checker")
# Class k pairs SHAPES[k % 11] with TEXTURES[k % 4]; 11 and 4 are coprime, so the first
# lcm = 44 classes are distinct (shape, texture) pairs.
MAX_CLASSES = len(SHAPES) * len(TEXTURES)

SIDE_RANGE = (300, 500)         # width and height, drawn independently (inclusive)
OBJECT_RADIUS = (0.22, 0.42)    # object radius as a share of the shorter side
TEXTURE_PERIODS = (2.0, 4.0)    # texture periods across one object radius
GRAIN_SIGMA = (3.0, 9.0)        # per-pixel sensor-like noise (grey levels): gives photo-like JPEG sizes
BACKGROUND_OCTAVES = (2, 3, 6, 12, 24, 48)
MIN_FG_BG_DISTANCE = 90.0       # RGB distance between object and background colours; else redraw
PREVIEW_TILES = 40


@dataclass(frozen=True)
class Style:
    """Which (shape, texture) pair each class is, and how big pictures and objects are."""
    shapes: Tuple[str, ...]
    textures: Tuple[str, ...]
    sides: Tuple[int, int]           # width and height, drawn independently (inclusive)
    radius: Tuple[float, float]      # object radius as a share of the shorter side
    turn: float = 180.0              # objects turn by up to +-turn degrees from upright
    background: float = 1.0          # strength of the background's colour blend and mottling
    distance: float = MIN_FG_BG_DISTANCE  # least RGB distance of the object's colour from the background's

    @property
    def max_classes(self) -> int:    # class k is (shapes[k % S], textures[k % T]): distinct up to lcm(S, T)
        return math.lcm(len(self.shapes), len(self.textures))

    def pair(self, class_index: int) -> Tuple[str, str]:
        return self.shapes[class_index % len(self.shapes)], self.textures[class_index % len(self.textures)]


STYLES = {
    "photo": Style(SHAPES, TEXTURES, SIDE_RANGE, OBJECT_RADIUS),
    # ten silhouettes told apart at 32 px (the hexagon, too close to the circle there, is left out),
    # one colour each (stripes, dots and checkers alias at that size), filling most of the picture
    "demo": Style(("circle", "triangle", "square", "star", "ring", "cross", "crescent", "arrow", "heart",
                   "tee"), ("plain",), (96, 128), (0.30, 0.45), turn=45.0, background=0.4, distance=120.0),
}


# ---------------------------------------------------------------------------------------------------
# Classes
def class_names(classes: int, style: str = "photo") -> List[str]:
    """Folder names ``c000_circle-plain`` ..., sorted in class order."""
    return ["c{:03d}_{}-{}".format(k, *STYLES[style].pair(k)) for k in range(classes)]


# ---------------------------------------------------------------------------------------------------
# Drawing
def _star(points: int, inner: float) -> np.ndarray:
    a = np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.sin(a), -r * np.cos(a)], -1)


def _regular(k: int) -> np.ndarray:
    a = np.arange(k) * 2.0 * np.pi / k
    return np.stack([np.sin(a), -np.cos(a)], -1)


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 3.0], -1) / 17.0


# Outlines in object coordinates (unit radius, y down); round shapes are drawn as ellipses instead.
_OUTLINES = {
    "triangle": _regular(3),
    "square": _regular(4) @ np.array([[math.cos(math.pi / 4), -math.sin(math.pi / 4)],
                                       [math.sin(math.pi / 4), math.cos(math.pi / 4)]]),
    "star": _star(5, 0.42),
    "cross": np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3], [0.3, 1],
                       [-0.3, 1], [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]], float),
    "hexagon": _regular(6),
    "arrow": np.array([[0, -1], [0.75, -0.15], [0.28, -0.15], [0.28, 1], [-0.28, 1], [-0.28, -0.15],
                       [-0.75, -0.15]], float),
    "heart": _heart(),
    "tee": np.array([[-1, -0.85], [1, -0.85], [1, -0.35], [0.25, -0.35], [0.25, 1], [-0.25, 1],
                     [-0.25, -0.35], [-1, -0.35]], float),
}


def shape_mask(shape: str, height: int, width: int, centre: Tuple[float, float], radius: float,
               angle: float) -> np.ndarray:
    """float32 (H, W) coverage in [0, 1] of ``shape`` (slightly soft edges, like a photographed object)."""
    im = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(im)
    cx, cy = centre

    def disc(dx: float, dy: float, r: float, fill: int) -> None:
        x, y = cx + dx * radius, cy + dy * radius
        draw.ellipse([x - r * radius, y - r * radius, x + r * radius, y + r * radius], fill=fill)

    if shape == "circle":
        disc(0, 0, 1.0, 255)
    elif shape == "ring":
        disc(0, 0, 1.0, 255)
        disc(0, 0, 0.55, 0)
    elif shape == "crescent":
        c, s = math.cos(angle), math.sin(angle)
        disc(0, 0, 1.0, 255)
        disc(0.45 * c, 0.45 * s, 0.85, 0)
    else:
        c, s = math.cos(angle), math.sin(angle)
        pts = _OUTLINES[shape] @ np.array([[c, s], [-s, c]]) * radius + np.array([cx, cy])
        draw.polygon([tuple(p) for p in pts], fill=255)
    im = im.filter(ImageFilter.GaussianBlur(0.8))
    return np.asarray(im, np.float32) / 255.0


def texture_pattern(texture: str, height: int, width: int, centre: Tuple[float, float], radius: float,
                    angle: float, rng: np.random.Generator) -> np.ndarray:
    """float32 (H, W) in [0, 1] mixing weight between the object's two colours, in object coordinates
    (so the pattern turns and scales with the object)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c, s = math.cos(angle), math.sin(angle)
    u = ((x - centre[0]) * c + (y - centre[1]) * s) / radius
    v = (-(x - centre[0]) * s + (y - centre[1]) * c) / radius
    periods = rng.uniform(*TEXTURE_PERIODS)
    if texture == "plain":  # a soft shading ramp only: the object is one (noisy) colour
        return np.clip(0.5 + 0.25 * u, 0.0, 1.0)
    if texture == "stripes":
        return (np.sin(u * periods * np.pi) > 0).astype(np.float32)
    if texture == "checker":
        return ((np.floor(u * periods * 0.5) + np.floor(v * periods * 0.5)) % 2).astype(np.float32)
    # dots: discs on a lattice
    fu, fv = (u * periods * 0.5) % 1.0 - 0.5, (v * periods * 0.5) % 1.0 - 0.5
    return (fu * fu + fv * fv < 0.09).astype(np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, 3)


def textured_background(rng: np.random.Generator, height: int, width: int, strength: float = 1.0) -> np.ndarray:
    """float32 (H, W, 3) in [0, 255]: two random colours blended by multi-scale noise, plus fine detail;
    ``strength`` scales how far the blend and the mottling stray from the first colour."""
    n = smooth_noise(rng, height, width, channels=3, octaves=BACKGROUND_OCTAVES, persistence=0.6)
    c0, c1 = _random_colour(rng), _random_colour(rng)
    rgb = c0 + strength * (c1 - c0) * n[..., :1]
    rgb += strength * 50.0 * (n[..., 1:] - 0.5).mean(axis=-1, keepdims=True)  # luminance mottling
    return rgb.astype(np.float32)


def _object_colours(rng: np.random.Generator, background: np.ndarray,
                    distance: float = MIN_FG_BG_DISTANCE) -> Tuple[np.ndarray, np.ndarray]:
    """Two colours for the object, the first far enough from the background's mean colour to be seen."""
    mean = background[::8, ::8].reshape(-1, 3).mean(axis=0)  # a subsample is plenty for a mean colour
    first = _random_colour(rng)
    for _ in range(32):
        if np.linalg.norm(first - mean) >= distance:
            break
        first = _random_colour(rng)
    second = _random_colour(rng)
    for _ in range(32):
        if np.linalg.norm(second - first) >= MIN_FG_BG_DISTANCE:
            break
        second = _random_colour(rng)
    return first, second


def render_synth(rng: np.random.Generator, class_index: int, style: str = "photo") -> np.ndarray:
    """One picture of class ``class_index``: uint8 (H, W, 3) with H, W in the style's ``sides``."""
    st = STYLES[style]
    shape, texture = st.pair(class_index)
    width, height = (int(v) for v in rng.integers(st.sides[0], st.sides[1] + 1, 2))
    radius = rng.uniform(*st.radius) * min(width, height)
    centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
    angle = rng.uniform(0.0, 2.0 * np.pi) if st.turn >= 180.0 else np.radians(rng.uniform(-st.turn, st.turn))

    background = textured_background(rng, height, width, st.background)
    first, second = _object_colours(rng, background, st.distance)
    weight = texture_pattern(texture, height, width, centre, radius, angle, rng)[..., None]
    if texture == "plain":  # a shading ramp of one colour, not a second colour
        second = first * 0.55
    obj = first + (second - first) * weight
    mask = shape_mask(shape, height, width, centre, radius, angle)[..., None]
    rgb = background + (obj - background) * mask
    rgb += rng.normal(0.0, rng.uniform(*GRAIN_SIGMA), (height, width, 1)).astype(np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# Data set
def synth_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), class_index, index])


def _write_one(task: Tuple[str, int, int], out_dir: str, classes: int, seed: int, style: str = "photo") -> str:
    split, class_index, index = task
    path = Path(out_dir) / split / class_names(classes, style)[class_index] / f"{index:05d}.jpg"
    write_jpeg(path, render_synth(synth_rng(seed, split, class_index, index), class_index, style))
    return str(path)


def _check_args(classes: int, train_per_class: int, val_per_class: int, seed: int, style: str = "photo") -> None:
    if style not in STYLES:
        raise UserError(f"--style must be one of {', '.join(STYLES)}, got {style!r}")
    if not 1 <= classes <= STYLES[style].max_classes:
        raise UserError(f"--classes must lie in [1, {STYLES[style].max_classes}] (style {style}), got {classes}")
    if train_per_class < 0 or val_per_class < 0:
        raise UserError("--train-per-class and --val-per-class must be >= 0")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")


def generate_synth(out_dir, classes: int = 10, train_per_class: int = 100, val_per_class: int = 20,
                   seed: int = 0, overwrite: bool = False, preview=None, jobs: Optional[int] = None,
                   style: str = "photo") -> List[str]:
    """Write the labelled set in class-folder layout; returns the written paths (train first).

    ``overwrite`` removes only the ``train`` and ``val`` sub-folders of a non-empty ``out_dir``.
    ``preview``: optional PNG contact sheet (a few training pictures of every class).
    ``style``: a key of ``STYLES`` (``photo``: the ImageNet-like default; ``demo``: see the module).
    """
    _check_args(classes, train_per_class, val_per_class, seed, style)
    out = prepare_out_dir(out_dir, overwrite, owned=SPLITS)
    names = class_names(classes, style)
    tasks = []
    for split, per_class in zip(SPLITS, (train_per_class, val_per_class)):
        for k, name in enumerate(names):
            (out / split / name).mkdir(parents=True, exist_ok=True)
            tasks += [(split, k, i) for i in range(per_class)]
    work = functools.partial(_write_one, out_dir=str(out), classes=classes, seed=seed, style=style)
    paths = pool_map(work, tasks, jobs, progress="synth")
    if preview and paths:
        contact_sheet(_preview_picks(paths, names), preview, cols=min(classes, 10), tile=128)
    return paths


def _preview_picks(paths: Sequence[str], names: Sequence[str]) -> List[str]:
    """Up to PREVIEW_TILES paths, row-major with one column per class, so each column is one class."""
    cols = min(len(names), 10)
    rows = max(1, PREVIEW_TILES // cols)
    by_class = {name: [p for p in paths if Path(p).parent.name == name] for name in names[:cols]}
    picks = []
    for r in range(rows):
        for name in names[:cols]:
            if r < len(by_class[name]):
                picks.append(by_class[name][r])
    return picks


# ---------------------------------------------------------------------------------------------------
# CLI
def _run(args: argparse.Namespace) -> int:
    from dali_ipmix.outputs import check_output_file
    start = time.perf_counter()
    if args.preview:
        check_output_file(args.preview, "--preview", args.overwrite)
    paths = generate_synth(args.out, classes=args.classes, train_per_class=args.train_per_class,
                           val_per_class=args.val_per_class, seed=args.seed, overwrite=args.overwrite,
                           preview=args.preview, jobs=args.jobs, style=args.style)
    took = time.perf_counter() - start
    print(f"synth: {len(paths)} images ({args.classes} classes x {args.train_per_class} train + "
          f"{args.val_per_class} val) in {took:.1f} s ({len(paths) / max(took, 1e-9):.1f} img/s, "
          f"{resolve_jobs(args.jobs)} jobs) -> {args.out}" + (f"; preview {args.preview}" if args.preview else ""))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth", help="generate a small ImageNet-like labelled set (class-folder layout)",
        description="Write OUT/train/<class>/*.jpg and OUT/val/<class>/*.jpg: each class is a shape x texture "
                    "drawn at random position/scale/rotation/colour over a textured background.")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent unless --overwrite)")
    p.add_argument("--classes", type=int, default=10, help=f"number of classes, 1..{MAX_CLASSES} "
                   f"(style demo: 1..{STYLES['demo'].max_classes}; default %(default)s)")
    p.add_argument("--train-per-class", type=int, default=100, help="training pictures per class (default %(default)s)")
    p.add_argument("--val-per-class", type=int, default=20, help="validation pictures per class (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--style", choices=sorted(STYLES), default="photo",
                   help="photo: 300-500 px pictures, 44 shape x texture classes; demo: the built-in demo's "
                   "96-128 px pictures of 10 plain silhouettes (default %(default)s)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per CPU)")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse a non-empty --out, replacing its train/ and val/ sub-folders (other files stay)")
    p.add_argument("--preview", default=None, metavar="PNG", help="also write a contact sheet here")
    p.set_defaults(func=_run)
