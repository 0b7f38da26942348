"""Small helpers shared by the image-set generators: output folders, JPEG/PNG writing, a process pool."""
from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
from PIL import Image

from dali_ipmix.errors import UserError

T = TypeVar("T")
R = TypeVar("R")

JPEG_QUALITY = 90
# Tasks handed to a worker at once: big enough to hide the pickling round trip, small enough
# that the last chunks still spread over all workers.
MAX_CHUNK = 32


def prepare_out_dir(path: Union[str, os.PathLike], overwrite: bool, owned: Sequence[str] = ()) -> Path:
    """Create ``path`` for a generator; refuse a non-empty one unless ``overwrite``.

    With ``overwrite`` only the entries named in ``owned`` (the sub-folders/files the generator
    itself writes, e.g. ``("ifs", "orbit")``) are removed; anything else in the folder is left in
    place, so a mistyped ``--out`` never wipes unrelated data.
    """
    from dali_ipmix.outputs import check_output_folder

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder; choose another folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"output folder {out} is not empty; pass --overwrite or choose another folder")
        for name in owned:
            victim = out / name
            if victim.is_dir() and not victim.is_symlink():
                shutil.rmtree(victim)
            elif victim.exists() or victim.is_symlink():
                victim.unlink()
    return check_output_folder(out, "--out")


def _remove_dead_stages(folder: Path, prefix: str) -> None:
    """Remove the stage folders (``<prefix><pid>-*``) that a run killed outright (SIGKILL, a power
    cut) left behind: those whose process no longer exists."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder / name, ignore_errors=True)
        except OSError:
            pass                 # alive (another user's process): leave it


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises KeyboardInterrupt meanwhile (its default would end the process without
    cleaning up), so that a stopped run removes its stage like a Ctrl-C does."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def staged(out: Path, owned: Sequence[str]):
    """Yield a fresh folder to generate into (a hidden sibling of ``out``); when the block ends
    normally, the ``owned`` entries of ``out`` are replaced by the generated ones, else the
    generated files are removed.  So an interrupted run (Ctrl-C, an error) leaves ``out`` as it
    was, never a partial set that looks complete to the readers."""
    out = Path(out)
    for prefix, folder in ((f".{out.name}.incomplete-", out.parent), (".incomplete-", out)):
        _remove_dead_stages(folder, prefix)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.incomplete-{os.getpid()}-", dir=out.parent))
    except OSError:             # a parent folder we may not write into: stage inside ``out``
        stage = Path(tempfile.mkdtemp(prefix=f".incomplete-{os.getpid()}-", dir=out))
    try:
        with _sigterm_raises():
            yield stage
        for name in owned:
            old, new = out / name, stage / name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif old.exists() or old.is_symlink():
                old.unlink()
            if new.exists():
                shutil.move(str(new), str(old))   # a rename on one file system
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_jpeg(path: Union[str, os.PathLike], array: np.ndarray, quality: int = JPEG_QUALITY,
               subsampling: str = "4:2:0") -> Path:
    """Write an HxWx3 uint8 array as a baseline (non-progressive) JPEG, which nvJPEG decodes on the GPU.

    ``subsampling``: chroma subsampling, "4:2:0" (photo-like, smaller) or "4:4:4" (keeps one-pixel
    colour detail, e.g. fractal dust); nvJPEG decodes both.
    """
    path = Path(path)
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 array, got shape {arr.shape}")
    Image.fromarray(arr, "RGB").save(path, "JPEG", quality=int(quality), subsampling=subsampling,
                                     progressive=False, optimize=False)
    return path


def _as_tile(image: Union[np.ndarray, str, os.PathLike], tile: int) -> Image.Image:
    im = image if isinstance(image, Image.Image) else (
        Image.fromarray(np.asarray(image, dtype=np.uint8)) if isinstance(image, np.ndarray) else Image.open(image)
    )
    im = im.convert("RGB")
    # Fit inside the tile keeping the aspect ratio, so a contact sheet shows the true shapes.
    scale = tile / max(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.BILINEAR)


def contact_sheet(images: Sequence, path: Union[str, os.PathLike], cols: int = 8, tile: int = 128) -> Path:
    """Write a PNG grid of ``images`` (arrays, PIL images or file paths), ``cols`` per row, ``tile`` px cells."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    cols = max(1, min(int(cols), len(images)))
    rows = math.ceil(len(images) / cols)
    gap = 2
    sheet = Image.new("RGB", (cols * (tile + gap) + gap, rows * (tile + gap) + gap), (32, 32, 32))
    for k, image in enumerate(images):
        im = _as_tile(image, tile)
        r, c = divmod(k, cols)
        x = gap + c * (tile + gap) + (tile - im.width) // 2
        y = gap + r * (tile + gap) + (tile - im.height) // 2
        sheet.paste(im, (x, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, "PNG")
    return path


def resolve_jobs(jobs: Optional[int]) -> int:
    """The worker processes of ``--jobs``: ``None`` means one per CPU; below 1 is refused."""
    if jobs is None:
        return max(1, os.cpu_count() or 1)
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1 (or left out: one per CPU), got {jobs}")
    return int(jobs)


def _pool_context():
    # Not plain fork: the caller may already run threads (torch, DALI), and forking those can hang.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def pool_map(fn: Callable[[T], R], items: Iterable[T], jobs: Optional[int] = None,
             progress: Optional[str] = None) -> List[R]:
    """``[fn(x) for x in items]`` over ``jobs`` processes (in order); runs inline for one job or item.

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one).
    ``progress``: the label of a progress line (``dali_ipmix.progress``; terminals only).
    """
    from dali_ipmix.progress import track
    items = list(items)
    workers = min(resolve_jobs(jobs), len(items))
    if workers <= 1:
        results = map(fn, items)
        return list(track(results, progress, len(items)) if progress else results)
    chunk = max(1, min(MAX_CHUNK, len(items) // (workers * 4)))
    with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
        results = pool.map(fn, items, chunksize=chunk)
        return list(track(results, progress, len(items)) if progress else results)


# Octave cell counts of ``smooth_noise``: from a few blobs per image down to fine mottling.
NOISE_OCTAVES = (2, 4, 8, 16, 32)
NOISE_SAMPLES_PER_CELL = 4


@functools.lru_cache(maxsize=64)
def _interp_taps(n_out: int, cells: int) -> Tuple[np.ndarray, np.ndarray]:
    """Left lattice index and smoothstep weight of each of ``n_out`` samples over ``cells`` cells.

    Smoothstep rather than linear weights: linear interpolation of value noise shows creases on the
    lattice lines.
    """
    u = (np.arange(n_out) + 0.5) * (cells / n_out)
    i0 = np.minimum(u.astype(np.int64), cells - 1)
    f = (u - i0).astype(np.float32)
    return i0, f * f * (3.0 - 2.0 * f)


def _upsample(lattice: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    # Gather + lerp instead of an interpolation-matrix product: matmul would go through a
    # multi-threaded BLAS, which oversubscribes the CPUs when several worker processes run.
    i0, s = _interp_taps(n_out, lattice.shape[axis] - 1)
    shape = [1] * lattice.ndim
    shape[axis] = n_out
    s = s.reshape(shape)
    lo = np.take(lattice, i0, axis=axis)
    hi = np.take(lattice, i0 + 1, axis=axis)
    return lo + (hi - lo) * s


def smooth_noise(rng: np.random.Generator, height: int, width: int, channels: int = 1,
                 octaves: Sequence[int] = NOISE_OCTAVES, persistence: float = 0.5) -> np.ndarray:
    """Summed value noise (a cheap stand-in for diamond-square "plasma"), float32 (H, W, C), each channel in [0, 1].

    Octave k has ``octaves[k]`` lattice cells across the longer side and amplitude ``persistence**k``.
    The sum is built at NOISE_SAMPLES_PER_CELL samples per finest cell and resized to (H, W): the
    noise has no finer detail, and a big picture costs little more than a small one.
    """
    longer = max(height, width)
    scale = min(1.0, NOISE_SAMPLES_PER_CELL * max(octaves) / longer)
    h, w = max(2, round(height * scale)), max(2, round(width * scale))
    out = np.zeros((h, w, channels), np.float32)
    amp = 1.0
    for cells in octaves:
        gy = max(1, round(cells * height / longer))
        gx = max(1, round(cells * width / longer))
        lattice = rng.random((gy + 1, gx + 1, channels), dtype=np.float32)
        out += amp * _upsample(_upsample(lattice, 0, h), 1, w)
        amp *= persistence
    lo = out.min(axis=(0, 1), keepdims=True)
    hi = out.max(axis=(0, 1), keepdims=True)
    out = (out - lo) / np.maximum(hi - lo, 1e-6)
    if (h, w) == (height, width):
        return out
    big = [np.asarray(Image.fromarray(np.ascontiguousarray(out[..., c]), "F").resize((width, height), Image.BICUBIC))
           for c in range(channels)]
    return np.clip(np.stack(big, -1), 0.0, 1.0)
