"""Readers and decoders: the ImageNet-style class-folder reader and the mixing-set reader.

Folder problems are found here, before DALI starts, and reported as one line naming the folder.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from .errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
TRAIN_READER = "Reader"
MIXING_READER = "Mixing"
VAL_READER = "Reader"
# The most pixels a picture may claim in its header (Pillow's MAX_IMAGE_PIXELS, 1024 x 1024 x 1024
# bytes / 4 / 3): a few bytes can claim 65000 x 65000 pixels (a decompression bomb) and take
# 16 GB and minutes to decode.  `verify --max-pixels` and train.py's --max-pixels change it.
MAX_PIXELS = 89_478_485


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _kind_of_mode(mode: int) -> str:
    return ("" if stat.S_ISREG(mode) else "FIFO" if stat.S_ISFIFO(mode) else
            "socket" if stat.S_ISSOCK(mode) else
            "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "folder" if stat.S_ISDIR(mode) else "special file")


def special_kind(path) -> str:
    """'' for a regular file, a link to one or a broken link; else what the entry is ('FIFO',
    'socket', 'device', ...).  Opening a FIFO blocks until someone writes into it, so only regular
    files are ever opened as images; a broken link stays listed and the reader's error names it."""
    try:
        return _kind_of_mode(os.stat(path).st_mode)
    except OSError:
        return ""


LINK_LOOP = "symbolic link loop"


def _entry_kind(entry: os.DirEntry) -> str:
    """'' for a regular file (or a broken link), LINK_LOOP for a link that leads back to itself
    (opening it fails with ELOOP), else what ``special_kind`` says."""
    try:
        if entry.is_file():          # the listing's file type: no stat for a plain file
            return ""
        return _kind_of_mode(entry.stat().st_mode)
    except OSError as e:
        return LINK_LOOP if e.errno == errno.ELOOP else ""


def _walk(top):
    """``os.walk(top)`` (same order, links to folders not followed, unreadable folders skipped)
    yielding (folder, DirEntry of each non-folder), so file types come with the listing."""
    try:
        with os.scandir(top) as it:
            entries = list(it)
    except OSError:
        return
    dirs, others = [], []
    for e in entries:
        try:
            is_dir = e.is_dir()
        except OSError:
            is_dir = False
        (dirs if is_dir else others).append(e)
    yield top, others
    for d in dirs:
        if not d.is_symlink():
            yield from _walk(d.path)


_REPORTED = set()


def _image_files(root: Path, top: Path, flag: str, keep_loops: bool = False):
    """Relative paths of the image files under ``top`` (sorted per folder), leaving out entries
    that are no regular files; a note on stderr names those, once per folder.  A symbolic link
    loop under an image name stops here with one line (the reader would stop on it later), unless
    ``keep_loops`` (``dali-ipmix verify`` lists it as unreadable)."""
    files, skipped = [], []
    for folder, entries in _walk(top):
        for e in sorted(entries, key=lambda e: e.name):
            if _is_image(e.name):
                rel = str(Path(folder, e.name).relative_to(root))
                kind = _entry_kind(e)
                if kind == LINK_LOOP and not keep_loops:
                    raise UserError(f"{flag} {root}: {Path(folder, e.name)} is a {LINK_LOOP} (a link "
                                    f"that leads back to itself) and cannot be read; remove it or "
                                    f"point it at a picture (`dali-ipmix verify {root}"
                                    f"{' --mixing' if top == root else ''}` lists every unreadable "
                                    f"file)")
                if kind and kind != LINK_LOOP:
                    skipped.append(f"{rel} ({kind})")
                else:
                    files.append(rel)
    if skipped and (str(top), tuple(skipped)) not in _REPORTED:
        _REPORTED.add((str(top), tuple(skipped)))
        shown = ", ".join(skipped[:5]) + (f", ... ({len(skipped)} in all)" if len(skipped) > 5 else "")
        print(f"note: {flag} {top}: skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} "
              f"with an image name that {'is' if len(skipped) == 1 else 'are'} no regular file: "
              f"{shown}", file=sys.stderr, flush=True)
    return files


def class_names(root, flag="--data") -> List[str]:
    """The class folders of ``root``, sorted (their index is the label).  Lists ``root`` only,
    not the class folders."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{flag} {root}: no such folder; give a folder of class sub-folders "
                        f"(root/<class>/<image>.jpg)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{flag} {root}: no class sub-folders; expected root/<class>/<image>.jpg")
    return classes


def class_folder_files(root, flag="--data", keep_loops=False):
    """(files, labels, class names) of a class-folder data set (``root/<class>/<image>``)."""
    root = Path(root)
    classes = class_names(root, flag)
    files, labels = [], []
    for label, name in enumerate(classes):
        found = _image_files(root, root / name, flag, keep_loops)
        files += found
        labels += [label] * len(found)
    if not files:
        raise UserError(f"{flag} {root}: the class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files, labels, classes


def listed_or_found(root, filelist=None, flag="--data"):
    """(files, labels, classes) from a verified file list (``dali-ipmix verify --write-filelist``)
    when one is given, else from the class folders; the class names always come from the folders,
    whose numbering the file list uses (with a list, only ``root`` itself is listed, and a bad
    file the list leaves out is not looked at)."""
    if filelist is None:
        return class_folder_files(root, flag=flag)
    classes = class_names(root, flag)
    files, labels = filelist_files(filelist, root=root)
    bad = next(((i, l) for i, l in enumerate(labels) if l >= len(classes)), None)
    if bad is not None:
        raise UserError(f"file list {filelist}: label {bad[1]} of {files[bad[0]]} is out of range: "
                        f"{root} has {len(classes)} class folders (labels 0..{len(classes) - 1}); "
                        f"write the list again with `dali-ipmix verify {root} --write-filelist "
                        f"{filelist} --overwrite`")
    return files, labels, classes


def filelist_files(path, root=None) -> Tuple[List[str], List[int]]:
    """(files, labels) from a DALI file list, in the format of ``readers.class_folder_files``
    (relative paths, int labels).  With ``root``, every listed file must exist under it."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"file list {path}: cannot read it ({e.__class__.__name__}); give a file "
                        f"written by `dali-ipmix verify DIR --write-filelist FILE`") from None
    files, labels = [], []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.rstrip().rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise UserError(f"file list {path}, line {no}: expected 'relative/path label', got {line!r}")
        files.append(parts[0].rstrip())
        labels.append(int(parts[1]))
    if not files:
        raise UserError(f"file list {path}: no files listed")
    if root is not None:
        missing = next((f for f in files if not os.path.isfile(os.path.join(root, f))), None)
        if missing is not None:
            raise UserError(f"file list {path}: {missing} is not in {root}; write the list again with "
                            f"`dali-ipmix verify {root} --write-filelist {path} --overwrite`")
    return files, labels


def picture_files(root, flag="--mixing", filelist=None, keep_loops=False):
    """All pictures under ``root`` (flat or nested), relative paths, sorted."""
    if filelist is not None:
        return filelist_files(filelist, root=root)[0]
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{flag} {root}: no such folder; give a folder of mixing pictures "
                        f"(e.g. made by `dali-ipmix fractals --out DIR`)")
    files = sorted(_image_files(root, root, flag, keep_loops))
    if not files:
        raise UserError(f"{flag} {root}: no pictures found ({', '.join(IMAGE_EXTENSIONS)}); "
                        f"generate some with `dali-ipmix fractals --out {root}`")
    return files


def picture_size(path):
    """(width, height) that the header of the picture at ``path`` claims, read without decoding
    it (Pillow's ``Image.open`` parses the header only); None when it cannot be read."""
    from PIL import Image
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None    # open() checks the size
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def too_many_pixels(size, max_pixels: int = MAX_PIXELS) -> str:
    """'' when a picture of ``size`` (width, height) is within ``max_pixels``, else why not."""
    if size is None or size[0] * size[1] <= max_pixels:
        return ""
    return (f"its header claims {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, more than the "
            f"limit of {max_pixels:,} (--max-pixels of verify and train.py; a decompression bomb "
            f"or a picture too large to decode)")


def decode_device(device: str) -> str:
    return "mixed" if device == "gpu" else "cpu"


def train_images(data, *, device, size, shard_id=0, num_shards=1, seed=None,
                 random_area=(0.08, 1.0), random_aspect_ratio=(3 / 4, 4 / 3), hw_decoder_load=0.65):
    """The training reader of ``data`` (a ``sources.DataSource``: the pipelines open it, so this
    module stays below ``sources``) + decode fused with RandomResizedCrop + resize (torchvision
    defaults).
    Returns (images uint8 HWC size x size on ``device``, labels int32 CPU)."""
    from nvidia.dali import fn, types
    jpegs, labels = data.reader(
        name=TRAIN_READER, shard_id=shard_id, num_shards=num_shards, shuffle=True, seed=seed)
    extra = {"hw_decoder_load": hw_decoder_load} if device == "gpu" else {}
    images = fn.decoders.image_random_crop(
        jpegs, device=decode_device(device), output_type=types.RGB, random_area=list(random_area),
        random_aspect_ratio=list(random_aspect_ratio), num_attempts=10, **extra)
    images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                       antialias=True)
    return images, labels


MIXING_CACHE_MAX_MB = 4096     # the largest automatic decoder cache for the mixing set


def mixing_cache_mb(source) -> int:
    """GPU memory (MiB) that holds the whole mixing set decoded: the first picture's decoded size
    times the number of pictures, with 25 % to spare, at most ``MIXING_CACHE_MAX_MB``.  The size
    comes from the shard manifest, or the header of a local first picture (0: unknown, no cache)."""
    size = source.picture_size
    if size is None and source.format == "folders" and not source.on_s3 and source.files:
        size = picture_size(Path(source.root) / source.files[0])
    if size is None:
        return 0                      # an unreadable picture is reported by the reader itself
    width, height = size
    return min(MIXING_CACHE_MAX_MB, int(width * height * 3 * source.size * 1.25 / 2 ** 20) + 1)


def mixing_pictures(mixing, *, device, size, resize, seed=None, stream_seed=None, cache_mb="auto"):
    """The mixing-set reader (``mixing``: a ``sources.DataSource``): its own shuffling and seed; Resize(shorter
    side -> resize) then RandomCrop(size), as the official code prepares the fractal picture.

    ``stream_seed`` (one per rank): the order the reader walks the pictures in.  DALI's reader
    shuffles its file list with one fixed seed and then picks from a 1024-file buffer, so readers
    given the same list walk the same sequence in step whatever their seed; the official code
    draws its picture independently in every process (``np.random.choice``).  The list is
    therefore permuted per rank first (shard sets: the order of the shards).

    On GPU the decoded pictures are kept in the mixed decoder's cache (``cache_mb`` MiB, "auto":
    the whole set, see ``mixing_cache_mb``; 0: none): the same few thousand pictures are drawn
    again and again, and decoding them every batch would cost as much as a third of the source
    decoding.  The first pass over the set fills the cache."""
    from nvidia.dali import fn, types
    source = mixing
    if stream_seed is not None:
        source = source.permuted(stream_seed)
    kw = {} if seed is None else {"seed": seed}
    data, _ = source.reader(name=MIXING_READER, shuffle=True, seed=seed, labelled=False)
    cache = {}
    if device == "gpu":
        mb = mixing_cache_mb(source) if cache_mb == "auto" else int(cache_mb)
        if mb > 0:
            cache = dict(cache_size=mb, cache_type="threshold", cache_threshold=0)
    pics = fn.decoders.image(data, device=decode_device(device), output_type=types.RGB, **cache)
    pics = fn.resize(pics, resize_shorter=resize, interp_type=types.INTERP_LINEAR, antialias=True)
    pos = dict(crop_pos_x=fn.random.uniform(range=[0.0, 1.0], **kw),
               crop_pos_y=fn.random.uniform(range=[0.0, 1.0], **kw))
    return fn.crop(pics, crop=[size, size], **pos)


def val_images(data, *, device, size, resize, shard_id=0, num_shards=1):
    """Validation (``data`` as in ``train_images``): Resize(shorter -> resize) + CenterCrop(size),
    no shuffling.  Each rank keeps its shard in every pass (``stick_to_shard``; DALI's reader
    moves to the next shard after each epoch by default), so passes over it -- the clean and the
    robust evaluation -- see the same images, the ones ``training.robust`` counts as this rank's."""
    from nvidia.dali import fn, types
    jpegs, labels = data.reader(
        name=VAL_READER, shard_id=shard_id, num_shards=num_shards, shuffle=False,
        stick_to_shard=True)
    images = fn.decoders.image(jpegs, device=decode_device(device), output_type=types.RGB)
    images = fn.resize(images, resize_shorter=resize, interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.crop(images, crop=[size, size]), labels


def unreadable_reason(path: Path, words: str, max_pixels: int = MAX_PIXELS) -> str:
    """Why the picture ``path`` failed to read, in words for an error line: a broken link, too many
    pixels, gone, unreadable, empty, else ``words`` (the decoder's complaint).  Shared by
    ``dali-ipmix verify`` and ``dali-ipmix eval``."""
    if path.is_symlink() and not path.exists():
        return "it is a broken link"
    too_large = too_many_pixels(picture_size(path), max_pixels)
    if too_large:
        return too_large
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "it no longer exists"
    except OSError as e:
        return f"it cannot be read ({e.strerror})"
    return "it is empty (0 bytes)" if size == 0 else words


def subset_indices(n: int, limit: Optional[int]) -> "np.ndarray":
    """``limit`` indices spread evenly over ``range(n)`` (files are sorted by class, so every class
    keeps a share); all of them without a limit."""
    import numpy as np
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(1, limit)).round().astype(np.int64))
