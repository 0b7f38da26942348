"""dali_ipmix: IPMix (Huang et al., NeurIPS 2023) as NVIDIA DALI pipeline graphs.

Modules, one per concern: ``config`` (op tables, presets), ``tape`` (per-sample random draws),
``reference`` (NumPy/PIL oracle), ``ops`` (readable DALI backend), ``fused`` (fused torch
kernel), ``readers`` (data and mixing-set readers), ``augment`` (IPMix in a graph), ``data``
(fractal and demo-data generators).  Heavy libraries are imported by the modules that need them.
"""
from .config import CIFAR, IMAGENET, IPMixConfig, preset  # noqa: F401

__version__ = "0.1.0"
