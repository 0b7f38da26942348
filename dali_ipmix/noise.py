"""Counter-based noise for the random_pixels / random_elems masks.

The official code draws the masks with ``torch.rand``; we draw them from a hash of
(per-step seed, pixel index) so that a mask is a pure function of the tape: the DALI graph, the
fused torch kernel and the NumPy reference compute the same mask from the same 24-bit seed, and a
recorded tape replays bit for bit.  The hash only uses ``>> ^ * &`` on non-negative int64 values
below 2^60, so it is exact in NumPy, torch and DALI arithmetic alike.
"""
from __future__ import annotations

import numpy as np

MUL = 0x45D9F3B        # the "lowbias" 32-bit integer hash multiplier
MASK32 = 0xFFFFFFFF
INV_2_24 = 1.0 / (1 << 24)


def hash32(x, mask32=MASK32):
    """A 32-bit avalanche hash of ``x`` (int64 values in [0, 2^32)); ``mask32`` may be a DALI
    int64 constant, since DALI turns Python ints above 2^31 into int32 overflows."""
    x = (((x >> 16) ^ x) * MUL) & mask32
    x = (((x >> 16) ^ x) * MUL) & mask32
    return (x >> 16) ^ x


def uniform_bits(index, seed, mask32=MASK32):
    """Integer in [0, 2^24) for each element index under a seed; / 2^24 gives U[0, 1) exactly
    representable in float32."""
    return hash32(index ^ hash32(seed, mask32), mask32) >> 8


def pixel_index(height: int, width: int, channels: int) -> np.ndarray:
    """Element indices [H, W, C] (int64): one per pixel (channels=1) or per element."""
    return np.arange(height * width * channels, dtype=np.int64).reshape(height, width, channels)


def uniform_np(seed: int, height: int, width: int, channels: int) -> np.ndarray:
    """U[0, 1) noise [H, W, C] as float32 (reference implementation)."""
    bits = uniform_bits(pixel_index(height, width, channels), np.int64(seed))
    return bits.astype(np.float32) * np.float32(INV_2_24)
