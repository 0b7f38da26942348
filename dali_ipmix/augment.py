"""IPMix inside a DALI graph, on the chosen pixel backend, from tapes drawn in the graph."""
from __future__ import annotations

from . import config as C
from .tape import dali_tape

BACKENDS = ("fused", "dali", "none")


def ipmix(images, pictures, cfg: C.IPMixConfig, *, device: str, backend: str = "fused",
          seed=None):
    """Views [V, 3, S, S] (normalised float) of uint8 HWC ``images`` mixed with ``pictures``.

    backend: ``fused`` (one batched torch kernel; compiled on GPU), ``dali`` (readable graph of
    stock DALI ops; needs ``enable_conditionals=True``) or ``none`` (normalise only: the
    no-augmentation ceiling).  Returns (views, tapes), tapes being the CPU parameter records.
    """
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    n_aug = 2 if cfg.jsd else 1
    tapes = [dali_tape(cfg, None if seed is None else seed + i) for i in range(n_aug)]
    if backend == "none":
        from .ops import normalize
        from nvidia.dali import fn
        view = normalize(images, cfg)
        return fn.stack(*([view] * cfg.views), axis=0), tapes
    if backend == "dali":
        from .ops import ipmix_views
        return ipmix_views(images, pictures, tapes, cfg), tapes
    from .fused import fused_ipmix_node
    return fused_ipmix_node(images, pictures, tapes, cfg, device), tapes


def training_outputs(images, pictures, labels, cfg: C.IPMixConfig, *, device: str, backend: str,
                     extra_outputs: bool = False, dtype: str = "float"):
    """The outputs of a training graph: (views, labels) or, with ``extra_outputs``, also the crops,
    the mixing pictures and the tapes [A, L] (to replay a batch through the reference)."""
    from nvidia.dali import fn, types
    views, tapes = ipmix(images, pictures, cfg, device=device, backend=backend)
    if dtype == "float16":
        views = fn.cast(views, dtype=types.FLOAT16)
    labels = labels.gpu() if device == "gpu" else labels
    if extra_outputs:
        return views, labels, images, pictures, fn.stack(*tapes, axis=0)
    return views, labels
