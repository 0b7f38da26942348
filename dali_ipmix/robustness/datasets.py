"""Evaluation data sets: uint8 HxWx3 crops and integer labels, as torch map-style datasets.

* class folders (``root/<class>/<image>``), local or ``s3://``, or shards of them (any labelled
  source of :mod:`dali_ipmix.sources`): PIL decode, Resize(resize) of the shorter side
  (bilinear) and CenterCrop(size) with torchvision's PIL functions: the IPMix / ImageNet-C
  evaluation transform; folders are mapped to labels by name (``label_of``), so ImageNet-C,
  ImageNet-R and ImageNet-A folders line up with the model's classes;
* an ImageNet-C copy (``root/<corruption>/<severity>/<class>/<image>``): one class-folder set per
  (corruption, severity), or a shard set (``dali-ipmix shard``) per (corruption, severity); local or
  under ``s3://`` (listed once as a whole);
* a CIFAR-C copy (``root/<corruption>.npy``, 5 severities x N images of 32x32x3 uint8 stacked in
  severity order, and ``root/labels.npy``);
* generated corruptions: any of the above with :func:`corruptions.corrupt` applied to the crop.

Images are uint8 until the model wrapper, which scales to [0, 1] and normalises (the corruptions
and the PGD budget live in pixel space).  Layout problems raise a one-line ``UserError``.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .. import readers, s3, sources
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


def read_failure(path: str, error: Exception, flag: str, source) -> ImageReadError:
    """The one line for a picture of ``source`` (a ``DataSource``) that cannot be decoded."""
    from ..verify import verify_command
    words = str(error).splitlines()[0] if str(error) else ""
    decoded = f"it cannot be decoded ({type(error).__name__}: {words})"
    if source.format == "folders" and not source.on_s3:
        why = readers.unreadable_reason(Path(path), decoded)
        command = verify_command(source.root).replace(" --write-filelist good.txt", "")
        return ImageReadError(f"{path}: the evaluation stopped on this file ({flag}), {why}; list every "
                              f"bad file with {command}, move them out of the folder, then rerun "
                              f"dali-ipmix eval")
    if source.format == "folders":
        fix = (f"list every bad file with `dali-ipmix verify {source.root}`, replace or delete them in the "
               f"bucket, then rerun dali-ipmix eval")
    elif source.on_s3:
        fix = (f"list every bad member with `dali-ipmix verify {source.root}`, write the shard set again "
               f"with `dali-ipmix shard ... --overwrite` (bad pictures are left out) and upload it again")
    else:
        fix = (f"list every bad member with `dali-ipmix verify {source.root}`, then write the shards "
               f"again with `dali-ipmix shard ... --overwrite` (bad pictures are left out)")
    return ImageReadError(f"{path}: the evaluation stopped on this picture ({flag}), {decoded}; {fix}")


class ClassFolderImages(torch.utils.data.Dataset):
    """A class-labelled data source -> (uint8 crop, label): class folders ``root/<class>/<image>``,
    local or ``s3://``, or a shard set of them (``dali-ipmix shard``), opened with
    :func:`dali_ipmix.sources.open_source` (``root`` may be its ``DataSource``); each sample's
    bytes are read from the source (a file, a tar member, an S3 object or ranged read).
    ``label_of`` maps class names to labels; classes it does not name are skipped (ImageNet-C's
    1000 folders for a subset model), and without it labels follow the source's class order
    (the sorted folder names)."""

    def __init__(self, root, *, resize: int, size: int, label_of: Optional[Mapping[str, int]] = None,
                 flag: str = "--data", max_images: Optional[int] = None):
        source = sources.open_source(root, flag=flag)
        pictures, labels = sources.samples(source)
        classes = source.classes
        if label_of is None:
            label_of = {name: i for i, name in enumerate(classes)}
        keep = [(p, y) for p, y in zip(pictures, labels) if classes[y] in label_of]
        if not keep:
            shown = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
            what = "class folders" if source.format == "folders" else "classes"
            raise UserError(f"{flag} {source}: none of its {what} ({shown}) is a class of the "
                            f"model; the folder names must be the model's class names (e.g. wnids)")
        keep.sort(key=lambda item: item[1])     # by class (shards are shuffled): --max-images spreads
        keep = [keep[i] for i in subset_indices(len(keep), max_images)]
        self.source, self.resize, self.size, self.flag = source, resize, size, flag
        self.samples = [p for p, _ in keep]
        self.labels = [label_of[classes[y]] for _, y in keep]
        self.classes_found = sorted({classes[y] for _, y in keep})

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        sample = self.samples[i]
        try:
            with Image.open(io.BytesIO(sample.read(self.flag))) as im:
                return eval_crop(im, self.resize, self.size), self.labels[i]
        except UserError as e:   # S3's one line; as an ImageReadError it survives a DataLoader worker
            raise ImageReadError(str(e)) from None
        except Exception as e:   # Pillow raises OSError, SyntaxError, ValueError... for bad data
            raise read_failure(sample.name, e, self.flag, self.source) from None


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
                    flag: str = "--imagenet-c") -> Dict[Tuple[str, int], object]:
    """{(corruption, severity): its class folders or shard set} of an ImageNet-C copy, checked
    before any work: local paths, or under ``s3://`` the ``DataSource`` of each (corruption,
    severity) prefix, all from one listing of the whole copy (not one per severity)."""
    if s3.is_s3(root):
        listing = s3.list_prefix(root, flag)
        root = listing.uri
        parts = listing.by_prefix(2)     # "corruption/severity" -> its objects
        tree: Dict[str, set] = {}        # corruption -> its severity prefixes that hold objects
        for rel in parts:
            corruption, severity = rel.split("/")
            tree.setdefault(corruption, set()).add(severity)
        npy = any(k.endswith(".npy") and "/" not in k for k in listing.objects)

        def at(name, sev):
            rel = f"{name}/{sev}"
            return sources.open_source(s3.join(root, rel), flag=flag, listing=parts[rel])
    else:
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"{flag} {root}: no such folder; expected {IMAGENET_C_LAYOUT} (ImageNet-C layout)")
        npy = any(root.glob("*.npy"))
        tree = {c: set(_subdirs(root / c)) for c in _subdirs(root)}

        def at(name, sev):
            return root / name / str(sev)
    if npy:
        raise UserError(f"{flag} {root}: holds .npy files, which is the CIFAR-C layout; pass it as --cifar-c")
    present = sorted(tree)
    missing = [c for c in corruption_names if c not in tree]
    if missing:
        found = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "") if present else "no folders"
        raise UserError(f"{flag} {root}: no folder for {', '.join(missing[:3])}"
                        f"{' (+%d more)' % (len(missing) - 3) if len(missing) > 3 else ''} (found {found}); "
                        f"expected {IMAGENET_C_LAYOUT} (ImageNet-C layout), or choose others with --corruptions")
    sets = {}
    for name in corruption_names:
        for sev in severities:
            if str(sev) not in tree[name]:
                raise UserError(f"{flag} {root}: no severity folder {name}/{sev} "
                                f"(found {', '.join(sorted(tree[name])) or 'none'}); expected "
                                f"{IMAGENET_C_LAYOUT} with severities 1-5")
            sets[(name, sev)] = at(name, sev)
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
