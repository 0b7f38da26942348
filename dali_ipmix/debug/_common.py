"""What the debugging commands share: their common flags, the config and training pipeline they
build, the tiny generated data set.  What they share with the demo's pictures sits lower: a
pipeline's outputs as NumPy samples (``pipelines.samples``), a view as a picture and the sheets'
drawing (``sheet``)."""
from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

from .. import config as C
from ..errors import UserError

DEVICES = ("cpu", "gpu")
# The mixing pictures of the ImageNet graph are resized to 256 before the 224 crop; other crop
# sizes keep that ratio.


# ---------------------------------------------------------------------------------------------
# Flags.

def add_data_args(p) -> None:
    p.add_argument("--data", default=None, metavar="DIR",
                   help="class-folder training images (root/<class>/<image>); with --mixing. "
                        "Without both, a tiny generated set in a temporary folder is used")
    p.add_argument("--mixing", default=None, metavar="DIR", help="mixing pictures (e.g. from `dali-ipmix fractals`)")


def add_config_args(p) -> None:
    p.add_argument("--preset", choices=sorted(C.PRESETS), default="imagenet",
                   help="training recipe and its graph (default %(default)s)")
    p.add_argument("--jsd", action=argparse.BooleanOptionalAction, default=None,
                   help="clean + two IPMix views (--jsd, the presets' default) or one view (--no-jsd)")
    p.add_argument("--k", type=int, default=None, help="chains (default: the preset's)")
    p.add_argument("--t", type=int, default=None, help="maximum chain depth (default: the preset's)")
    p.add_argument("--image-size", type=int, default=None,
                   help="crop size in pixels (default: the preset's; patch sizes above it are dropped)")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the pipeline runs (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="pipeline seed (default %(default)s)")


def make_config(preset: str, jsd: Optional[bool] = None, k: Optional[int] = None,
                t: Optional[int] = None, image_size: Optional[int] = None) -> C.IPMixConfig:
    """The preset with the flags' changes; a bad value is a one-line UserError."""
    base = C.preset(preset)
    changes = {name: v for name, v in (("jsd", jsd), ("k", k), ("t", t)) if v is not None}
    if image_size is not None:
        changes["image_size"] = image_size
        changes["patch_sizes"] = tuple(s for s in base.patch_sizes if s <= image_size) or (image_size,)
    try:
        return base.replace(**changes) if changes else base
    except ValueError as e:
        raise UserError(str(e).replace("IPMix config: ", "--")) from None


def config_from_args(args) -> C.IPMixConfig:
    return make_config(args.preset, args.jsd, args.k, args.t, args.image_size)


def config_dict(cfg: C.IPMixConfig) -> dict:
    import dataclasses
    return {f.name: (list(v) if isinstance(v, tuple) else v)
            for f in dataclasses.fields(cfg) for v in [getattr(cfg, f.name)]}


def check_device(device: str) -> None:
    if device == "gpu" and not has_gpu():
        raise UserError("--device gpu: no CUDA GPU is visible here; use --device cpu")


def has_gpu() -> bool:
    try:
        from nvidia.dali.backend import GetCUDADeviceCount
        return GetCUDADeviceCount() > 0
    except Exception:      # no driver: DALI raises instead of returning 0
        return False


def check_new_files(paths: Sequence[Path], overwrite: bool, out_dir: Optional[Path] = None) -> None:
    """Refuse to replace files the user already has, unless --overwrite, and a place that cannot
    take them (``outputs.check_output_file``), before the pipeline runs.  ``out_dir``: the --out
    folder that holds ``paths``, created when they are written."""
    from ..outputs import check_folder_can_be_made, check_output_file
    if out_dir is not None and not out_dir.exists():
        check_folder_can_be_made(out_dir, "--out")
        return
    for path in paths:
        if path.exists() and not overwrite:
            raise UserError(f"{path} exists; pass --overwrite or choose another --out")
        if path.exists() and path.is_dir():
            raise UserError(f"{path} is a folder; choose another --out")
        check_output_file(path, "--out", overwrite=True)


@contextlib.contextmanager
def bad_files_named(data, mixing, use: str):
    """A DALI error about a bad data file becomes one line naming it (``verify.explain_pipeline_error``)."""
    try:
        yield
    except RuntimeError as e:
        from ..sources import local_folders
        from ..verify import SEARCH_LIMIT, explain_pipeline_error, explain_shard_error
        error = explain_shard_error(e, [data, mixing], SEARCH_LIMIT) or explain_pipeline_error(
            e, local_folders([data]), local_folders([mixing]), search_limit=SEARCH_LIMIT, use=use)
        if error is None:
            raise
        raise error from None


# ---------------------------------------------------------------------------------------------
# Data.

@contextlib.contextmanager
def data_folders(data, mixing, seed: int = 0) -> Iterator[Tuple[object, object, bool]]:
    """(data, mixing, generated): the user's data sources (class folders, shard sets, s3://;
    ``sources.open_source``, listed here once), or a tiny generated set of folders that lives as
    long as the ``with`` block."""
    if (data is None) != (mixing is None):
        raise UserError("--data and --mixing go together: give both, or neither for a tiny generated set")
    if data is not None:
        from ..sources import open_source
        yield (open_source(data, flag="--data"),
               open_source(mixing, flag="--mixing", labelled=False), False)
        return
    from ._tiny_data import make_tiny_data
    with tempfile.TemporaryDirectory(prefix="dali-ipmix-debug-") as tmp:
        train, pictures = make_tiny_data(Path(tmp) / "data", seed=seed)
        yield train, pictures, True


# ---------------------------------------------------------------------------------------------
# The training pipeline.

def train_pipeline(data_dir, mixing_dir, cfg: C.IPMixConfig, preset: str, *, batch_size: int,
                   device: str, backend: str, seed: int, extra_outputs: bool = False):
    """The preset's training pipeline (not yet built), exactly as training builds it."""
    import pipelines
    return pipelines.train_pipeline(preset, data_dir, mixing_dir, cfg=cfg, batch_size=batch_size,
                                    num_threads=pipelines.cpu_threads(), device=device, backend=backend,
                                    seed=seed, extra_outputs=extra_outputs)


@contextlib.contextmanager
def pipeline_options(**options):
    """Every ``Pipeline`` constructed inside the block gets these constructor options (e.g.
    ``exec_dynamic=False, enable_memory_stats=True`` for executor statistics), without changing
    the functions that build the pipelines.  The original signature is kept visible because
    ``pipeline_def`` sorts its keyword arguments by it."""
    if not options:
        yield
        return
    from nvidia.dali import pipeline as dali_pipeline
    original = dali_pipeline.Pipeline.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        kwargs.update(options)
        original(self, *args, **kwargs)

    init.__signature__ = inspect.signature(original)
    dali_pipeline.Pipeline.__init__ = init
    try:
        yield
    finally:
        dali_pipeline.Pipeline.__init__ = original


STATS_OPTIONS = dict(exec_dynamic=False, enable_memory_stats=True)
