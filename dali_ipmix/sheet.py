"""Small PIL helpers for the contact sheets (``dali-ipmix preview``, the demo's batch sheet): tiles,
labels, coloured text lines."""
from __future__ import annotations

import functools
from typing import Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (28, 28, 28)
SEPARATOR = (90, 90, 90)
TEXT = (230, 230, 230)
DIM = (150, 150, 150)
# One colour per chain step: the step's text line and its patch box on the chain tile.
STEP_COLORS = ((255, 80, 80), (255, 200, 0), (0, 210, 255), (255, 90, 255), (120, 255, 120),
               (255, 150, 60), (160, 160, 255), (255, 255, 255))
FONT_SIZE = 11
LINE_HEIGHT = 14


@functools.lru_cache(maxsize=None)
def font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)     # Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


def text_width(text: str, size: int = FONT_SIZE) -> int:
    return int(np.ceil(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font(size))))


def to_display(view: np.ndarray, cfg) -> np.ndarray:
    """A normalised CHW float view back to HWC uint8 for showing it (``cfg``: an ``IPMixConfig``,
its ``mean`` and ``std``)."""
    mean = np.asarray(cfg.mean, np.float32)[:, None, None]
    std = np.asarray(cfg.std, np.float32)[:, None, None]
    rgb = (np.asarray(view, np.float32) * std + mean) * 255
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def tile_image(image: np.ndarray, tile: int) -> Image.Image:
    """An HWC uint8 image scaled to ``tile`` x ``tile``: nearest-neighbour when enlarging (so
    single pixels stay visible), bilinear when shrinking."""
    im = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    if im.size == (tile, tile):
        return im
    method = Image.NEAREST if tile >= max(im.size) else Image.BILINEAR
    return im.resize((tile, tile), method)


def draw_box(draw: ImageDraw.ImageDraw, origin: Tuple[int, int], scale: float, box: Sequence[float],
             color) -> None:
    """Outline a (top, left, height, width) pixel window of an image drawn at ``origin``."""
    top, left, height, width = box
    x0, y0 = origin[0] + left * scale, origin[1] + top * scale
    x1, y1 = origin[0] + (left + width) * scale - 1, origin[1] + (top + height) * scale - 1
    draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=color, width=1)


def draw_lines(draw: ImageDraw.ImageDraw, xy: Tuple[int, int], lines: Sequence[Tuple[str, tuple]]) -> None:
    """Draw (text, colour) lines from ``xy`` downwards."""
    x, y = xy
    for text, color in lines:
        draw.text((x, y), text, fill=color, font=font())
        y += LINE_HEIGHT
