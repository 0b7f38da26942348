"""Complete DALI pipeline definitions -- ImageNet-style training and validation
(``pipelines.imagenet``), CIFAR-sized training (``pipelines.cifar``) -- and the one place that
picks a preset's training graph and resize: train.py, ``dali-ipmix bench``, the debugging tools
and ``dali-ipmix eval`` all build theirs here (README "Layout", docs/architecture.md)."""


def resize_for(image_size: int, preset: str) -> int:
    """The shorter side an image is resized to before its crop (the mixing pictures in training,
    validation images): Resize(256) of a 224 crop, scaled with the crop (ImageNet); the picture
    itself (CIFAR, whose files are the crop size already)."""
    if preset == "cifar":
        return image_size
    return max(image_size, round(image_size * 256 / 224))


def train_pipeline(preset: str, data_dir, mixing_dir, *, cfg, **kwargs):
    """The training graph of ``preset`` ("imagenet" or "cifar"), not yet built; ``kwargs`` as in
    ``pipelines.imagenet.train_pipeline`` (the CIFAR graph takes the common subset)."""
    if preset == "cifar":
        from . import cifar
        return cifar.train_pipeline(data_dir, mixing_dir, cfg=cfg, **kwargs)
    from . import imagenet
    return imagenet.train_pipeline(data_dir, mixing_dir, cfg=cfg,
                                   resize=resize_for(cfg.image_size, preset),
                                   **kwargs)


def cpu_threads() -> int:
    """DALI CPU threads for a pipeline run on the host by the debugging tools and the demo's
    pictures: the cores this process may use, at most 4."""
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores))


def samples(tensor_list) -> list:
    """A DALI TensorList (CPU or GPU) as a list of NumPy arrays, one per sample."""
    import numpy as np
    as_cpu = getattr(tensor_list, "as_cpu", None)
    tl = as_cpu() if as_cpu is not None else tensor_list
    return [np.asarray(tl.at(i)) for i in range(len(tl))]
