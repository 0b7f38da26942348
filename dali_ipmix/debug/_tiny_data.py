"""A tiny generated data set for the debugging commands when no --data/--mixing is given.

It is made with the project's own generators (``dali-ipmix synth`` and ``dali-ipmix fractals``),
so it looks like the demo data, but is small enough to write in about a second.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

CLASSES = 2
PER_CLASS = 4
PICTURES = 4
PICTURE_SIZE = 128


def make_tiny_data(root, seed: int = 0) -> Tuple[Path, Path]:
    """Write ``root/synth/train/<class>/*.jpg`` and ``root/fractals/**.jpg``; returns
    (train_dir, mixing_dir).  ``root`` must be empty or absent."""
    from dali_ipmix.data.fractals import generate_fractals
    from dali_ipmix.data.synth import generate_synth

    root = Path(root)
    generate_synth(root / "synth", classes=CLASSES, train_per_class=PER_CLASS, val_per_class=0,
                   seed=seed, jobs=1)
    generate_fractals(root / "fractals", count=PICTURES, size=PICTURE_SIZE, seed=seed, jobs=1)
    return root / "synth" / "train", root / "fractals"
