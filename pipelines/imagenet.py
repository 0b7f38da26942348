"""The ImageNet IPMix training graph and the validation graph.

Training: the data source's reader (class folders, tar shards, S3; sharded per rank) -> decode
fused with RandomResizedCrop -> resize 224 ->
flip -> IPMix (mixing pictures from a second reader: resize 256 + random crop 224) -> normalised
CHW views [V, 3, 224, 224] (clean + 2 IPMix views with JSD) and labels.
Validation: resize 256 -> center crop 224 -> normalised CHW.
"""
from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

from dali_ipmix import config as C
from dali_ipmix import readers, sources
from dali_ipmix.augment import training_outputs


def _device_id(device):
    return 0 if device == "gpu" else None


def train_pipeline(data_dir, mixing_dir, *, cfg: C.IPMixConfig = C.IMAGENET, batch_size=64,
                   num_threads=4, device="gpu", device_id=None, backend="fused", seed=0,
                   shard_id=0, num_shards=1, dtype="float", resize=256, extra_outputs=False,
                   enable_checkpointing=False, checkpoint=None, hw_decoder_load=0.65,
                   prefetch_queue_depth=2, random_area=(0.08, 1.0), filelist=None,
                   mixing_filelist=None, draws=None, mixing_cache_mb="auto"):
    """Build (not yet started) the IPMix training pipeline.

    ``data_dir`` / ``mixing_dir``: the training set and the mixing set, each a class folder (a
    picture folder), a shard set, an ``s3://`` prefix or a ``sources.DataSource`` already listed.

    Outputs ``images`` [V, 3, S, S] and ``labels`` [1]; with ``extra_outputs`` also the raw crop,
    the mixing picture (uint8 HWC) and the tapes [A, L], for replay through the reference.
    Each rank gets its own shard and its own seed (``seed + 1000 * shard_id``).
    ``random_area``: the RandomResizedCrop area range (torchvision's default ``(0.08, 1)``).
    ``filelist`` / ``mixing_filelist``: verified file lists (``dali-ipmix verify --write-filelist``)
    that leave out bad files.  ``draws``: see ``augment.training_outputs`` (benchmarks).
    ``mixing_cache_mb``: GPU decoder cache for the mixing set (``readers.mixing_pictures``).
    """
    data = sources.open_source(data_dir, filelist=filelist)
    pictures = sources.open_source(mixing_dir, flag="--mixing", filelist=mixing_filelist,
                                   labelled=False)
    rank_seed = seed + 1000 * shard_id

    @pipeline_def(enable_conditionals=(backend == "dali"))
    def graph():
        images, labels = readers.train_images(
            data, device=device, size=cfg.image_size, shard_id=shard_id,
            num_shards=num_shards, hw_decoder_load=hw_decoder_load, random_area=random_area)
        images = fn.flip(images, horizontal=fn.random.coin_flip())
        pics = readers.mixing_pictures(pictures, device=device, size=cfg.image_size,
                                       resize=resize, stream_seed=rank_seed,
                                       cache_mb=mixing_cache_mb)
        return training_outputs(images, pics, labels, cfg, device=device, backend=backend,
                                extra_outputs=extra_outputs, dtype=dtype, draws=draws)

    kw = {} if checkpoint is None else {"checkpoint": checkpoint}
    return graph(batch_size=batch_size, num_threads=num_threads,
                 device_id=_device_id(device) if device_id is None else device_id,
                 seed=rank_seed, enable_checkpointing=enable_checkpointing,
                 prefetch_queue_depth=prefetch_queue_depth, **kw)


def val_pipeline(data_dir, *, cfg: C.IPMixConfig = C.IMAGENET, batch_size=64, num_threads=4,
                 device="gpu", device_id=None, shard_id=0, num_shards=1, resize=256,
                 dtype="float", filelist=None):
    """Resize 256 + center crop 224 + normalise; outputs ``images`` [3, S, S], ``labels``."""
    data = sources.open_source(data_dir, flag="--val-data", filelist=filelist)

    @pipeline_def
    def graph():
        images, labels = readers.val_images(data, device=device, size=cfg.image_size,
                                            resize=resize, shard_id=shard_id,
                                            num_shards=num_shards)
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT16 if dtype == "float16" else types.FLOAT,
            output_layout="CHW", mean=[255 * m for m in cfg.mean], std=[255 * s for s in cfg.std])
        return images, (labels.gpu() if device == "gpu" else labels)

    return graph(batch_size=batch_size, num_threads=num_threads,
                 device_id=_device_id(device) if device_id is None else device_id, seed=0)
