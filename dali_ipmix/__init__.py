"""dali_ipmix: IPMix (Huang et al., NeurIPS 2023) as NVIDIA DALI pipeline graphs.

Modules, one per concern: ``config`` (op tables, presets), ``tape`` (per-sample random draws),
``reference`` (NumPy/PIL oracle), ``ops`` (readable DALI backend), ``fused`` (the fast backend:
Triton kernels on the GPU, batched torch on the CPU) and ``fused_node`` (it as one DALI node),
``readers`` (data and mixing-set readers), ``augment`` (IPMix in a graph), ``data``
(fractal and demo-data generators), ``ipmix_loader`` (the public loaders: ``IPMixLoader``,
``IPMixValLoader``).  Heavy libraries are imported by the modules that need them (DALI when a loader
is first used).
"""
from .config import CIFAR, IMAGENET, IPMixConfig, preset  # noqa: F401


def __getattr__(name):
    # the loaders import DALI and torch: only when asked for (``from dali_ipmix import IPMixLoader``)
    if name in ("IPMixLoader", "IPMixValLoader"):
        from . import ipmix_loader
        return getattr(ipmix_loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__version__ = "0.1.0"
