"""Shared fixtures: real photographs (scikit-image ships a few in its wheel), cut into square
crops like the ones IPMix works on, and a probe for GPU tests."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg")


def _photo_dir():
    import skimage
    return os.path.join(os.path.dirname(skimage.__file__), "data")


def photo_crops(size: int, n: int, seed: int = 0):
    """``n`` square RGB uint8 crops of real photographs resized to ``size`` (varied scale)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = Image.open(os.path.join(_photo_dir(), PHOTOS[i % len(PHOTOS)])).convert("RGB")
        w, h = im.size
        side = int(min(w, h) * rng.uniform(0.4, 1.0))
        x0, y0 = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        crop = im.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR)
        out.append(np.asarray(crop))
    return out


@pytest.fixture(scope="session")
def photos64():
    return photo_crops(64, 6, seed=1)


@pytest.fixture(scope="session")
def partners64():
    return photo_crops(64, 6, seed=2)[::-1]


def has_gpu() -> bool:
    try:
        from nvidia.dali.backend import GetCUDADeviceCount
        return GetCUDADeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
