"""The images every contender reads: a given class-folder set and mixing set, or quick generated JPEGs.

Generated pictures are photo-like for the decoder (smooth colour noise plus grain, so the JPEGs
have realistic entropy), not meaningful for a model: throughput does not depend on content.
Sources are ``size`` px high and ``4/3 * size`` wide (a typical photo aspect, so RandomResizedCrop
and the decoder see non-square input); mixing pictures are ``size`` px squares, like the fractal
sets (`dali-ipmix fractals`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from dali_ipmix.data._io import smooth_noise, write_jpeg
from dali_ipmix.errors import UserError
from dali_ipmix.sources import DataSource, open_source

GRAIN_SIGMA = 10.0         # grey levels of per-pixel noise: photo-like JPEG sizes (~0.4 bytes/pixel at quality 90)
SOURCE_ASPECT = 4 / 3      # width / height of a generated source image


@dataclass(frozen=True)
class BenchData:
    """The two data sets every contender reads (``sources.DataSource`` records, listed once:
    class folders, shard sets or ``s3://``; the PIL rows read class folders only), and what is
    in them."""
    train_dir: DataSource
    mixing_dir: DataSource
    images: int
    pictures: int
    classes: int
    generated_images: bool
    generated_pictures: bool
    size: Optional[int] = None            # generated files: source height, mixing picture side (px)
    train_filelist: Optional[Path] = None  # verified file lists (`dali-ipmix verify --write-filelist`)
    mixing_filelist: Optional[Path] = None

    def describe(self) -> dict:
        paths = ("train_dir", "mixing_dir", "train_filelist", "mixing_filelist")
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return fields | {k: getattr(self, k) and str(getattr(self, k)) for k in paths} | {
            "train_format": self.train_dir.format, "mixing_format": self.mixing_dir.format}

    def train_files(self):
        """(files relative to ``train_dir``, labels): the file list's where given, else all found."""
        return list(_folders(self.train_dir).files), list(self.train_dir.labels)

    def mixing_files(self):
        return list(_folders(self.mixing_dir).files)


def _folders(source: DataSource) -> DataSource:
    if source.format != "folders" or source.on_s3:
        raise UserError(f"{source.flag} {source.location}: the PIL rows (reference, official) read "
                        f"local class folders, not {source.format} on {'S3' if source.on_s3 else 'disk'}; "
                        f"bench this data with the DALI rows (--contenders dali-plain,dali-ipmix,train)")
    return source


def noise_picture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3): two random colours blended by multi-scale noise, plus grain."""
    n = smooth_noise(rng, height, width, channels=3)
    rgb = n * rng.uniform(60, 255, 3) + rng.uniform(0, 80, 3)
    rgb += rng.normal(0.0, GRAIN_SIGMA, (height, width, 1))
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def write_sources(root: Path, count: int, size: int, classes: int, seed: int = 0) -> Path:
    """``count`` JPEGs in ``classes`` class folders under ``root`` (round robin)."""
    rng = np.random.default_rng([seed, 0])
    width = max(1, round(size * SOURCE_ASPECT))
    for i in range(count):
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        write_jpeg(folder / f"{i:05d}.jpg", noise_picture(rng, size, width))
    return root


def write_pictures(root: Path, count: int, size: int, seed: int = 0) -> Path:
    """``count`` square JPEG mixing pictures in ``root``."""
    rng = np.random.default_rng([seed, 1])
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        write_jpeg(root / f"{i:05d}.jpg", noise_picture(rng, size, size))
    return root


def check_folders(data_dir=None, mixing_dir=None, data_filelist=None, mixing_filelist=None):
    """(data, mixing) sources, None where not given: a one-line UserError naming --data / --mixing
    if a given location is missing or holds no images.  The sources are listed here, once."""
    return (None if data_dir is None else open_source(data_dir, flag="--data", filelist=data_filelist),
            None if mixing_dir is None else open_source(mixing_dir, flag="--mixing",
                                                        filelist=mixing_filelist, labelled=False))


def bench_data(workdir: Path, *, data_dir=None, mixing_dir=None, images: int = 256,
               pictures: int = 64, size: int = 256, classes: int = 4, seed: int = 0,
               data_filelist=None, mixing_filelist=None) -> BenchData:
    """The folders to read: ``data_dir`` / ``mixing_dir`` where given, else generated in ``workdir``."""
    for flag, value in (("--gen-images", images), ("--gen-pictures", pictures),
                        ("--gen-size", size), ("--gen-classes", classes)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    gen_images, gen_pictures = data_dir is None, mixing_dir is None
    for flag, listed, folder in (("--data-filelist", data_filelist, data_dir),
                                 ("--mixing-filelist", mixing_filelist, mixing_dir)):
        if listed is not None and folder is None:
            raise UserError(f"{flag} {listed}: needs the folder it lists ({flag.split('-file')[0]} DIR)")
    # a wrong location is reported before any generation
    data, mixing = check_folders(data_dir, mixing_dir, data_filelist, mixing_filelist)
    if gen_images:
        data = open_source(write_sources(Path(workdir) / "train", images, size, classes, seed))
    if gen_pictures:
        mixing = open_source(write_pictures(Path(workdir) / "mixing", pictures, size, seed),
                             flag="--mixing", labelled=False)
    return BenchData(data, mixing, data.size, mixing.size, len(data.classes),
                     gen_images, gen_pictures, size if gen_images or gen_pictures else None,
                     data_filelist and Path(data_filelist), mixing_filelist and Path(mixing_filelist))
