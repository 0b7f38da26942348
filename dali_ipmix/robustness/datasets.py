"""Evaluation data sets: uint8 HxWx3 crops and integer labels, as torch map-style datasets.

* class folders (``root/<class>/<image>``): PIL decode, Resize(resize) of the shorter side
  (bilinear) and CenterCrop(size) with torchvision's PIL functions: the IPMix / ImageNet-C
  evaluation transform; folders are mapped to labels by name (``label_of``), so ImageNet-C,
  ImageNet-R and ImageNet-A folders line up with the model's classes;
* an ImageNet-C copy (``root/<corruption>/<severity>/<class>/<image>``): one class-folder set per
  (corruption, severity);
* a CIFAR-C copy (``root/<corruption>.npy``, 5 severities x N images of 32x32x3 uint8 stacked in
  severity order, and ``root/labels.npy``);
* generated corruptions: any of the above with :func:`corruptions.corrupt` applied to the crop.

Images are uint8 until the model wrapper, which scales to [0, 1] and normalises (the corruptions
and the PGD budget live in pixel space).  Layout problems raise a one-line ``UserError``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .. import readers
from ..readers import subset_indices
from ..errors import UserError
from . import corruptions
from .tables import CORRUPTIONS, SEVERITIES

IMAGENET_C_LAYOUT = "<corruption>/<severity>/<class>/<image>"
CIFAR_C_LAYOUT = "<corruption>.npy (5 severities x N images, 32x32x3 uint8) and labels.npy"


def eval_crop(image: Image.Image, resize: int, size: int) -> np.ndarray:
    """torchvision's Resize(resize) + CenterCrop(size) on a PIL image -> uint8 HxWx3."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    image = TF.resize(image.convert("RGB"), resize, interpolation=InterpolationMode.BILINEAR)
    return np.array(TF.center_crop(image, size), dtype=np.uint8)   # a writable copy


class ImageReadError(UserError):
    """A picture of an evaluation set that cannot be read.  Raised in a DataLoader worker, it comes
    back as this class with the worker's traceback as its text; ``one_line`` keeps the message."""

    MARK = "ImageReadError: "

    def one_line(self) -> str:
        text = str(self).strip()
        last = text.splitlines()[-1] if text else text
        return last.split(self.MARK, 1)[1] if self.MARK in last else last


def read_failure(path: Path, error: Exception, flag: str, root) -> ImageReadError:
    from ..verify import verify_command
    words = str(error).splitlines()[0] if str(error) else ""
    why = readers.unreadable_reason(path, f"it cannot be decoded ({type(error).__name__}: {words})")
    command = verify_command(root).replace(" --write-filelist good.txt", "")
    return ImageReadError(f"{path}: the evaluation stopped on this file ({flag}), {why}; list every bad "
                          f"file with {command}, move them out of the folder, then rerun dali-ipmix eval")


class ClassFolderImages(torch.utils.data.Dataset):
    """``root/<class>/<image>`` -> (uint8 crop, label).  ``label_of`` maps folder names to labels;
    folders it does not name are skipped (ImageNet-C's 1000 folders for a subset model), and
    without it labels follow the sorted folder names."""

    def __init__(self, root, *, resize: int, size: int, label_of: Optional[Mapping[str, int]] = None,
                 flag: str = "--data", max_images: Optional[int] = None):
        files, labels, classes = readers.class_folder_files(root, flag=flag)
        if label_of is None:
            label_of = {name: i for i, name in enumerate(classes)}
        keep = [(f, label_of[classes[y]]) for f, y in zip(files, labels) if classes[y] in label_of]
        if not keep:
            shown = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
            raise UserError(f"{flag} {root}: none of its class folders ({shown}) is a class of the "
                            f"model; the folder names must be the model's class names (e.g. wnids)")
        keep = [keep[i] for i in subset_indices(len(keep), max_images)]
        self.root, self.resize, self.size, self.flag = Path(root), resize, size, flag
        self.files = [f for f, _ in keep]
        self.labels = [y for _, y in keep]
        self.classes_found = sorted({Path(f).parts[0] for f in self.files})

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.root / self.files[i]
        try:
            with Image.open(path) as im:
                return eval_crop(im, self.resize, self.size), self.labels[i]
        except Exception as e:   # Pillow raises OSError, SyntaxError, ValueError... for bad data
            raise read_failure(path, e, self.flag, self.root) from None


class ArrayImages(torch.utils.data.Dataset):
    """In-memory (or memory-mapped) uint8 NxHxWx3 images and labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return np.array(self.images[i], dtype=np.uint8), int(self.labels[i])


class CorruptedImages(torch.utils.data.Dataset):
    """``base`` with one generated corruption at one severity; sample ``i`` is seeded by
    (seed, corruption, severity, i), so a run replays exactly with any number of workers."""

    def __init__(self, base, name: str, severity: int, seed: int = 0):
        self.base, self.name, self.severity, self.seed = base, name, severity, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        seed = corruptions.sample_seed(self.seed, self.name, self.severity, i)
        return corruptions.corrupt(image, self.name, self.severity, seed), label


def _subdirs(path: Path):
    return sorted(p.name for p in path.iterdir() if p.is_dir())


def imagenet_c_sets(root, corruption_names: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = SEVERITIES,
                    flag: str = "--imagenet-c") -> Dict[Tuple[str, int], Path]:
    """{(corruption, severity): class folder} of an ImageNet-C copy, checked before any work."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{flag} {root}: no such folder; expected {IMAGENET_C_LAYOUT} (ImageNet-C layout)")
    if any(root.glob("*.npy")):
        raise UserError(f"{flag} {root}: holds .npy files, which is the CIFAR-C layout; pass it as --cifar-c")
    present = _subdirs(root)
    missing = [c for c in corruption_names if c not in present]
    if missing:
        found = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "") if present else "no folders"
        raise UserError(f"{flag} {root}: no folder for {', '.join(missing[:3])}"
                        f"{' (+%d more)' % (len(missing) - 3) if len(missing) > 3 else ''} (found {found}); "
                        f"expected {IMAGENET_C_LAYOUT} (ImageNet-C layout), or choose others with --corruptions")
    sets = {}
    for name in corruption_names:
        levels = _subdirs(root / name)
        for s in severities:
            folder = root / name / str(s)
            if not folder.is_dir():
                raise UserError(f"{flag} {root}: no severity folder {name}/{s} "
                                f"(found {', '.join(levels) or 'none'}); expected {IMAGENET_C_LAYOUT} "
                                f"with severities 1-5")
            sets[(name, s)] = folder
    return sets


class CifarC:
    """A CIFAR-10-C / CIFAR-100-C folder, checked on opening; arrays are memory-mapped."""

    def __init__(self, root, corruption_names: Sequence[str] = CORRUPTIONS, flag: str = "--cifar-c"):
        root = Path(root)
        self.root, self.flag = root, flag
        if not root.is_dir():
            raise UserError(f"{flag} {root}: no such folder; expected {CIFAR_C_LAYOUT} (CIFAR-C layout)")
        if not (root / "labels.npy").is_file():
            hint = " (it has sub-folders: ImageNet-C layout? pass it as --imagenet-c)" if _subdirs(root) else ""
            raise UserError(f"{flag} {root}: no labels.npy; expected {CIFAR_C_LAYOUT}{hint}")
        self.labels = self._load(root / "labels.npy")
        if self.labels.ndim != 1 or len(self.labels) % len(SEVERITIES):
            raise UserError(f"{flag} {root / 'labels.npy'}: expected one label per image, 5 severities x N "
                            f"(CIFAR-C: 50000), got shape {self.labels.shape}")
        self.per_severity = len(self.labels) // len(SEVERITIES)
        self.arrays = {}
        for name in corruption_names:
            path = root / f"{name}.npy"
            if not path.is_file():
                raise UserError(f"{flag} {root}: no {name}.npy; expected {CIFAR_C_LAYOUT}, "
                                f"or choose others with --corruptions")
            data = self._load(path)
            if data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3 or len(data) != len(self.labels):
                raise UserError(f"{flag} {path}: expected uint8 of shape ({len(self.labels)}, H, W, 3) like "
                                f"labels.npy, got {data.dtype} {data.shape}")
            self.arrays[name] = data

    def _load(self, path):
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise UserError(f"{self.flag} {path}: not a readable .npy file ({e})") from None

    def images(self, name: str, severity: int, max_images: Optional[int] = None) -> ArrayImages:
        lo = (severity - 1) * self.per_severity
        idx = lo + subset_indices(self.per_severity, max_images)
        return ArrayImages(self.arrays[name][idx], self.labels[idx])
