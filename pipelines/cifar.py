"""The CIFAR-sized IPMix graph: 32 px, flip + RandomCrop(32, padding=4), fractal Resize(36) +
RandomCrop(32), no self-mix (the official cifar.py), images from a class-folder copy of CIFAR."""
from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

from dali_ipmix import config as C
from dali_ipmix import readers, sources
from dali_ipmix.augment import training_outputs

PAD = 4


def _padded_random_crop(images, size):
    # RandomCrop(size, padding=4): a window anchored at an integer drawn uniformly from -4..4 (the
    # zero-padded image's torch.randint(0, 9) minus the padding); discrete values, since a float
    # draw cast to int rounds to nearest and would skew the ends.
    anchor = fn.random.uniform(values=list(range(-PAD, PAD + 1)), shape=[2], dtype=types.INT32)
    anchor = fn.cast(anchor, dtype=types.FLOAT)
    return fn.slice(images, anchor, types.Constant([float(size), float(size)]), axes=[0, 1],
                    normalized_anchor=False, normalized_shape=False,
                    out_of_bounds_policy="pad", fill_values=0)


def train_pipeline(data_dir, mixing_dir, *, cfg: C.IPMixConfig = C.CIFAR, batch_size=128,
                   num_threads=4, device="gpu", device_id=None, backend="fused", seed=0,
                   shard_id=0, num_shards=1, extra_outputs=False, enable_checkpointing=False,
                   checkpoint=None, filelist=None, mixing_filelist=None, dtype="float",
                   mixing_cache_mb="auto"):
    """Like ``pipelines.imagenet.train_pipeline``: outputs views [V, 3, 32, 32] and labels (with
    ``extra_outputs`` also crops, mixing pictures and tapes).  Validation: the ImageNet
    ``val_pipeline`` with ``resize=32`` (the pictures themselves)."""
    data = sources.open_source(data_dir, filelist=filelist)
    pictures = sources.open_source(mixing_dir, flag="--mixing", filelist=mixing_filelist,
                                   labelled=False)
    size = cfg.image_size
    rank_seed = seed + 1000 * shard_id

    @pipeline_def(enable_conditionals=(backend == "dali"))
    def graph():
        jpegs, labels = data.reader(name=readers.TRAIN_READER, shard_id=shard_id,
                                    num_shards=num_shards, shuffle=True)
        images = fn.decoders.image(jpegs, device=readers.decode_device(device), output_type=types.RGB)
        images = fn.resize(images, resize_x=size, resize_y=size)   # CIFAR files are 32 px already
        images = fn.flip(images, horizontal=fn.random.coin_flip())
        images = _padded_random_crop(images, size)
        pics = readers.mixing_pictures(pictures, device=device, size=size, resize=size + PAD,
                                       stream_seed=rank_seed,
                                       cache_mb=mixing_cache_mb)
        return training_outputs(images, pics, labels, cfg, device=device, backend=backend,
                                extra_outputs=extra_outputs, dtype=dtype)

    kw = {} if checkpoint is None else {"checkpoint": checkpoint}
    return graph(batch_size=batch_size, num_threads=num_threads,
                 device_id=(0 if device == "gpu" else None) if device_id is None else device_id,
                 seed=rank_seed,
                 enable_checkpointing=enable_checkpointing, **kw)
