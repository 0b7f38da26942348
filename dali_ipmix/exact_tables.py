"""Constants the pixel kernels look up instead of computing, so that their results are exactly
what PIL and NumPy compute: PIL's rotation matrices for whole degrees (``Image.rotate`` rounds
cos/sin to 15 decimals in double precision), ``k / 255`` in float32 (a correctly rounded division
that compiled code does not guarantee: Inductor rewrites ``x / c`` as ``x * (1 / c)``, Triton's
float32 ``/`` is approximate) and ``255.0 / k`` in float64 (autocontrast's scale).  Used by the
fused backend's torch code and by its Triton kernels (``dali_ipmix.fused``,
``dali_ipmix.triton_kernels``)."""
from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np
import torch


def pil_rotate_matrix(angle: float, width: int, height: int):
    """PIL ``Image.rotate(angle)`` (no expand, centre or translate) as AFFINE data, computed
    with the same double operations as Pillow."""
    angle = angle % 360.0
    cx, cy = width / 2, height / 2
    a = -math.radians(angle)
    m = [round(math.cos(a), 15), round(math.sin(a), 15), 0.0,
         round(-math.sin(a), 15), round(math.cos(a), 15), 0.0]
    m[2], m[5] = (m[0] * -cx + m[1] * -cy + m[2], m[3] * -cx + m[4] * -cy + m[5])
    m[2] += cx
    m[5] += cy
    return m


class ImageTables(NamedTuple):
    rot: torch.Tensor        # [360, 6] float64: rotation by d whole degrees, PIL's AFFINE data
    inv255: torch.Tensor     # [256] float32: k / 255
    scale: torch.Tensor      # [256] float64: 255.0 / k (255.0 at k = 0, never used)


_CACHE = {}
_LOCK = threading.Lock()


def image_tables(height: int, width: int, device) -> ImageTables:
    """The tables for ``width`` x ``height`` images on ``device`` (cached)."""
    device = torch.device(device)
    key = (int(height), int(width), device.type, device.index)
    with _LOCK:
        tables = _CACHE.get(key)
        if tables is None:
            rows = [pil_rotate_matrix(float(d), width, height) for d in range(360)]
            tables = _CACHE[key] = ImageTables(
                rot=torch.tensor(rows, dtype=torch.float64).to(device),
                inv255=torch.from_numpy(np.arange(256, dtype=np.float32) / np.float32(255)).to(device),
                scale=torch.tensor([255.0] + [255.0 / k for k in range(1, 256)],
                                   dtype=torch.float64).to(device))
    return tables
