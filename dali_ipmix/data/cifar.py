"""CIFAR-10/100 from a folder the user already has; nothing is ever downloaded (README
"Adversarial training on CIFAR-10", docs/adversarial.md "CIFAR").

Accepted layouts of ``root`` (checked in this order):

* the python-pickle release: ``root`` is, or contains, ``cifar-10-batches-py/``
  (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or ``cifar-100-python/``
  (``train``, ``test``, ``meta``; the 100 fine labels);
* class folders: ``root/train/<class>/*.png`` and ``root/test/<class>/*.png`` (``val/`` is accepted
  for ``test``), all images the same size.

``load_cifar(root, split)`` returns ``(images uint8 [N, H, W, 3], labels int64 [N], classes)``.
``write_class_folders`` turns arrays into the PNG class folders that ``pipelines/cifar.py`` reads;
``array_batches`` yields ``[0, 1]`` float batches for evaluation without DALI.

The pickles are read with an unpickler that only accepts the NumPy array globals a CIFAR file
contains, so a foreign pickle cannot run code.  Problems are reported as one-line
``UserError`` naming the folder or file.

Command line: ``python -m dali_ipmix.data.cifar --root DIR --out OUT`` writes
``OUT/train/<class>/*.png`` and ``OUT/val/<class>/*.png`` (the test split); with
``--val-holdout N``, ``OUT/val/`` holds N training images instead and the test split goes to
``OUT/test/``, so that choosing a checkpoint on val/ leaves the test set unseen.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np

from ..errors import UserError

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR100_FILES = {"train": ["train"], "test": ["test"]}
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")

# The only globals a CIFAR pickle references (numpy 1.x and 2.x module paths).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name} (not a CIFAR pickle)")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # truncated file, wrong format, refused global
        raise UserError(f"{path}: not a CIFAR python pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a CIFAR python pickle (holds {type(obj).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _names(values) -> List[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def find_pickle_dir(root) -> Path | None:
    """``root`` itself or its ``cifar-10-batches-py`` / ``cifar-100-python`` child, if it holds
    a pickle release; else None."""
    root = Path(root)
    for candidate in (root, root / CIFAR10_DIR, root / CIFAR100_DIR):
        if (candidate / "batches.meta").is_file() or (candidate / "meta").is_file():
            return candidate
    return None


def _load_pickles(folder: Path, split: str):
    cifar100 = (folder / "meta").is_file() and not (folder / "batches.meta").is_file()
    files = (CIFAR100_FILES if cifar100 else CIFAR10_FILES)[split]
    meta = _read_pickle(folder / ("meta" if cifar100 else "batches.meta"))
    name_key, label_key = ("fine_label_names", "fine_labels") if cifar100 else ("label_names", "labels")
    if name_key not in meta:
        raise UserError(f"{folder}: meta file has no {name_key!r} entry (not a CIFAR release?)")
    classes = _names(meta[name_key])
    images, labels = [], []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path}: missing; a complete {folder.name} release has "
                            f"{', '.join(CIFAR100_FILES[split] if cifar100 else CIFAR10_FILES[split])}")
        batch = _read_pickle(path)
        if "data" not in batch or label_key not in batch:
            raise UserError(f"{path}: no 'data'/'{label_key}' entries (not a CIFAR batch file)")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise UserError(f"{path}: 'data' has shape {data.shape}, expected [N, 3072]")
        # rows are the red plane, then green, then blue, each 32x32 row-major -> NHWC
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    images, labels = np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
    if len(labels) != len(images) or (len(labels) and not 0 <= labels.min() <= labels.max() < len(classes)):
        raise UserError(f"{folder}: labels do not match the images or the {len(classes)} classes")
    return images, labels, classes


def _split_dir(root: Path, split: str) -> Path | None:
    for name in ((split,) if split == "train" else ("test", "val")):
        if (root / name).is_dir():
            return root / name
    return None


def _load_class_folders(folder: Path):
    from PIL import Image
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as im:
                    images.append(np.asarray(im.convert("RGB")))
            except OSError as e:
                raise UserError(f"{path}: not a readable image ({e})") from None
            labels.append(label)
    if not images:
        raise UserError(f"{folder}: no images in class folders (expected {folder}/<class>/*.png)")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UserError(f"{folder}: images differ in size ({sorted(shapes)[:3]}...); CIFAR folders "
                        f"hold one size")
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


def load_cifar(root, split: str = "train") -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """``(images uint8 [N, H, W, 3], labels int64 [N], class names)`` of one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"CIFAR folder {root} does not exist (give the folder holding "
                        f"{CIFAR10_DIR}/ or train/<class>/ images; nothing is downloaded)")
    folder = find_pickle_dir(root)
    if folder is not None:
        return _load_pickles(folder, split)
    folder = _split_dir(root, split)
    if folder is not None:
        return _load_class_folders(folder)
    raise UserError(f"{root}: no CIFAR found (expected {CIFAR10_DIR}/, {CIFAR100_DIR}/ or "
                    f"{'train' if split == 'train' else 'test'}/<class>/*.png class folders)")


def write_class_folders(images: np.ndarray, labels: np.ndarray, classes, out_dir, *,
                        overwrite: bool = False) -> Path:
    """PNG files ``out_dir/<class>/<index:05d>.png`` (lossless) for the DALI class-folder reader."""
    from PIL import Image
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} is not empty; pass --overwrite to write into it")
    for name in classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(out / classes[int(label)] / f"{i:05d}.png")
    return out


def array_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *, device="cpu",
                  limit: int = 0) -> Iterator:
    """``(float32 [b, 3, H, W] in [0, 1], int64 [b])`` torch batches in file order (evaluation)."""
    import torch
    n = len(images) if not limit else min(limit, len(images))
    for start in range(0, n, batch_size):
        x = torch.from_numpy(images[start:min(start + batch_size, n)]).to(device)
        y = torch.from_numpy(labels[start:min(start + batch_size, n)]).to(device)
        yield x.permute(0, 3, 1, 2).float().div_(255.0), y


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dali_ipmix.data.cifar",
                                description="Write a local CIFAR release as PNG class folders "
                                "(OUT/train/<class>/, OUT/val/<class>/) for pipelines/cifar.py.")
    p.add_argument("--root", required=True, help="folder holding cifar-10-batches-py/ or cifar-100-python/")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--val-holdout", type=int, default=0, metavar="N",
                   help="write N training images (evenly spaced over the training list) to OUT/val/ "
                   "and the test split to OUT/test/: a validation split for choosing checkpoints "
                   "(Rice et al. hold out 1000); default 0: OUT/val/ is the test split")
    args = p.parse_args(argv)
    try:
        train = load_cifar(args.root, "train")
        test = load_cifar(args.root, "test")
        if not args.val_holdout:
            splits = (("train", train), ("val", test))
        else:
            from ..readers import subset_indices
            n = len(train[1])
            if not 0 < args.val_holdout < n:
                raise UserError(f"--val-holdout {args.val_holdout}: must be between 1 and {n - 1} "
                                f"(the training split of {args.root} has {n} images)")
            held = np.zeros(n, bool)
            held[subset_indices(n, args.val_holdout)] = True
            splits = (("train", (train[0][~held], train[1][~held], train[2])),
                      ("val", (train[0][held], train[1][held], train[2])), ("test", test))
        for name, (images, labels, classes) in splits:
            write_class_folders(images, labels, classes, os.path.join(args.out, name),
                                overwrite=args.overwrite)
            print(f"{name}: {len(images)} images, {len(classes)} classes -> {os.path.join(args.out, name)}")
    except UserError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
