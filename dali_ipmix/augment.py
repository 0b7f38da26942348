"""IPMix inside a DALI graph, on the chosen pixel backend, from random draws made in the graph."""
from __future__ import annotations

from . import config as C
from .ops import branch_free
from .tape import dali_tape, dali_uniforms

BACKENDS = ("fused", "dali", "none")


def ipmix(images, pictures, cfg: C.IPMixConfig, *, device: str, backend: str = "fused",
          seed=None, dtype: str = "float"):
    """Views [V, 3, S, S] (normalised) of uint8 HWC ``images`` mixed with ``pictures``.

    backend: ``fused`` (the fused kernels: Triton on GPU, eager torch on CPU; the graph only draws
    raw uniforms, the kernel decodes them), ``dali`` (readable graph of stock DALI ops, tapes
    decoded in the graph; needs ``enable_conditionals=True``) or ``none`` (normalise only: the
    no-augmentation ceiling).  ``dtype``: "float" (float32) or "float16" views.  Returns (views,
    tapes), tapes being the parameter records [A, L] per sample (for ``none``: drawn but unused,
    so that replay tools see the usual outputs).
    """
    import torch
    from nvidia.dali import fn
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "fused":
        from .fused_node import fused_ipmix_node
        uniforms = dali_uniforms(cfg, cfg.n_aug, seed)
        return fused_ipmix_node(images, pictures, uniforms, cfg, device,
                                out_dtype=torch.float16 if dtype == "float16" else torch.float32)
    tapes = [branch_free(dali_tape)(cfg, None if seed is None else seed + i) for i in range(cfg.n_aug)]
    if backend == "none":
        from .ops import normalize
        view = normalize(images, cfg, dtype)
        views = fn.stack(*([view] * cfg.views), axis=0)
    else:
        from nvidia.dali import types
        from .ops import ipmix_views
        views = ipmix_views(images, pictures, tapes, cfg)
        if dtype == "float16":
            views = fn.cast(views, dtype=types.FLOAT16)
    return views, fn.stack(*tapes, axis=0)


DRAWS = ("tapes", "uniforms")


def training_outputs(images, pictures, labels, cfg: C.IPMixConfig, *, device: str, backend: str,
                     extra_outputs: bool = False, dtype: str = "float", draws=None):
    """The outputs of a training graph: (views, labels) or, with ``extra_outputs``, also the crops,
    the mixing pictures and the tapes [A, L] (to replay a batch through the reference).

    ``draws`` (benchmarks): also output every view's random draws -- ``"tapes"`` decoded by DALI
    operators in the graph, ``"uniforms"`` raw -- to time what drawing costs without pixel work
    (with ``backend="none"``)."""
    from nvidia.dali import fn
    views, tapes = ipmix(images, pictures, cfg, device=device, backend=backend, dtype=dtype)
    labels = labels.gpu() if device == "gpu" else labels
    if extra_outputs:
        return views, labels, images, pictures, tapes
    if draws is not None:
        if draws not in DRAWS:
            raise ValueError(f"draws {draws!r}: choose one of {', '.join(DRAWS)}")
        if draws == "tapes":
            made = fn.stack(*[branch_free(dali_tape)(cfg) for _ in range(cfg.n_aug)], axis=0)
        else:
            made = dali_uniforms(cfg, cfg.n_aug)
        return views, labels, made.gpu() if device == "gpu" else made
    return views, labels
