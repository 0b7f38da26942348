"""Readers and decoders: the ImageNet-style class-folder reader and the mixing-set reader.

Folder problems are found here, before DALI starts, and reported as one line naming the folder.
"""
from __future__ import annotations

import os
from pathlib import Path

from .cli import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
TRAIN_READER = "Reader"
MIXING_READER = "Mixing"
VAL_READER = "Reader"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def class_folder_files(root, flag="--data"):
    """(files, labels, class names) of a class-folder data set (``root/<class>/<image>``)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{flag} {root}: no such folder; give a folder of class sub-folders "
                        f"(root/<class>/<image>.jpg)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{flag} {root}: no class sub-folders; expected root/<class>/<image>.jpg")
    files, labels = [], []
    for label, name in enumerate(classes):
        for dirpath, _, names in os.walk(root / name):
            for n in sorted(names):
                if _is_image(n):
                    files.append(str(Path(dirpath, n).relative_to(root)))
                    labels.append(label)
    if not files:
        raise UserError(f"{flag} {root}: the class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files, labels, classes


def listed_or_found(root, filelist=None, flag="--data"):
    """(files, labels, classes) from a verified file list (``dali-ipmix verify --write-filelist``)
    when one is given, else from the class folders; the class names always come from the folders,
    whose numbering the file list uses."""
    files, labels, classes = class_folder_files(root, flag=flag)
    if filelist is not None:
        from .verify import filelist_files
        files, labels = filelist_files(filelist, root=root)
    return files, labels, classes


def picture_files(root, flag="--mixing", filelist=None):
    """All pictures under ``root`` (flat or nested), relative paths, sorted."""
    if filelist is not None:
        from .verify import filelist_files
        return filelist_files(filelist, root=root)[0]
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{flag} {root}: no such folder; give a folder of mixing pictures "
                        f"(e.g. made by `dali-ipmix fractals --out DIR`)")
    files = sorted(str(Path(d, n).relative_to(root))
                   for d, _, names in os.walk(root) for n in names if _is_image(n))
    if not files:
        raise UserError(f"{flag} {root}: no pictures found ({', '.join(IMAGE_EXTENSIONS)}); "
                        f"generate some with `dali-ipmix fractals --out {root}`")
    return files


def decode_device(device: str) -> str:
    return "mixed" if device == "gpu" else "cpu"


def train_images(data_dir, *, device, size, shard_id=0, num_shards=1, seed=None,
                 random_area=(0.08, 1.0), random_aspect_ratio=(3 / 4, 4 / 3), files=None,
                 hw_decoder_load=0.65):
    """Class-folder reader + decode fused with RandomResizedCrop + resize (torchvision defaults).
    Returns (images uint8 HWC size x size on ``device``, labels int32 CPU)."""
    from nvidia.dali import fn, types
    if files is None:
        files, labels, _ = class_folder_files(data_dir)
    else:
        files, labels = files
    jpegs, labels = fn.readers.file(
        file_root=str(data_dir), files=files, labels=labels, shard_id=shard_id,
        num_shards=num_shards, random_shuffle=True, pad_last_batch=True, name=TRAIN_READER,
        **({} if seed is None else {"seed": seed}))
    extra = {"hw_decoder_load": hw_decoder_load} if device == "gpu" else {}
    images = fn.decoders.image_random_crop(
        jpegs, device=decode_device(device), output_type=types.RGB, random_area=list(random_area),
        random_aspect_ratio=list(random_aspect_ratio), num_attempts=10, **extra)
    images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                       antialias=True)
    return images, labels


MIXING_CACHE_MAX_MB = 4096     # the largest automatic decoder cache for the mixing set


def mixing_cache_mb(mixing_dir, files) -> int:
    """GPU memory (MiB) that holds the whole mixing set decoded: the first picture's decoded size
    times the number of pictures, with 25 % to spare, at most ``MIXING_CACHE_MAX_MB``."""
    from PIL import Image
    try:
        with Image.open(Path(mixing_dir) / files[0]) as im:      # reads the header only
            width, height = im.size
    except (OSError, IndexError):
        return 0                      # an unreadable picture is reported by the reader itself
    return min(MIXING_CACHE_MAX_MB, int(width * height * 3 * len(files) * 1.25 / 2 ** 20) + 1)


def mixing_pictures(mixing_dir, *, device, size, resize, seed=None, files=None, cache_mb="auto"):
    """The mixing-set reader: its own shuffling and seed; Resize(shorter side -> resize) then
    RandomCrop(size), as the official code prepares the fractal picture.

    On GPU the decoded pictures are kept in the mixed decoder's cache (``cache_mb`` MiB, "auto":
    the whole set, see ``mixing_cache_mb``; 0: none): the same few thousand pictures are drawn
    again and again, and decoding them every batch would cost as much as a third of the source
    decoding.  The first pass over the set fills the cache."""
    from nvidia.dali import fn, types
    files = picture_files(mixing_dir) if files is None else files
    kw = {} if seed is None else {"seed": seed}
    data, _ = fn.readers.file(file_root=str(mixing_dir), files=files, random_shuffle=True,
                              name=MIXING_READER, **kw)
    cache = {}
    if device == "gpu":
        mb = mixing_cache_mb(mixing_dir, files) if cache_mb == "auto" else int(cache_mb)
        if mb > 0:
            cache = dict(cache_size=mb, cache_type="threshold", cache_threshold=0)
    pics = fn.decoders.image(data, device=decode_device(device), output_type=types.RGB, **cache)
    pics = fn.resize(pics, resize_shorter=resize, interp_type=types.INTERP_LINEAR, antialias=True)
    pos = dict(crop_pos_x=fn.random.uniform(range=[0.0, 1.0], **kw),
               crop_pos_y=fn.random.uniform(range=[0.0, 1.0], **kw))
    return fn.crop(pics, crop=[size, size], **pos)


def val_images(data_dir, *, device, size, resize, shard_id=0, num_shards=1, files=None):
    """Validation: Resize(shorter -> resize) + CenterCrop(size), no shuffling."""
    from nvidia.dali import fn, types
    if files is None:
        files, labels, _ = class_folder_files(data_dir, flag="--val-data")
    else:
        files, labels = files
    jpegs, labels = fn.readers.file(file_root=str(data_dir), files=files, labels=labels,
                                    shard_id=shard_id, num_shards=num_shards,
                                    random_shuffle=False, pad_last_batch=True, name=VAL_READER)
    images = fn.decoders.image(jpegs, device=decode_device(device), output_type=types.RGB)
    images = fn.resize(images, resize_shorter=resize, interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.crop(images, crop=[size, size]), labels
