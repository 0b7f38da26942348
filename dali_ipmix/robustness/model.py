"""Loading a model to evaluate (the wrapper that feeds it pixels in [0, 1] is ``models.Normalized``).

A checkpoint is either a ``train.py`` checkpoint (a dict with ``model`` = state_dict, ``arch`` =
model name, ``args`` = dict with ``num_classes``, ``image_size``, ``preset``, ...) or a bare
state_dict, for which ``arch`` must be given.  Models come from :func:`dali_ipmix.models.get_model`
(the project's CIFAR networks, then torchvision's).  Checkpoints are unpickled with
``weights_only=False`` like ``train.py --resume`` does: load only files you trust.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..errors import UserError
from ..models import Normalized  # noqa: F401  (re-exported: the package's public name)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")   # DistributedDataParallel / torch.compile
GUESS_SECONDS = 5.0                            # time spent guessing a bare state_dict's arch


@dataclass
class Loaded:
    model: nn.Module                      # the bare network (expects normalised input)
    arch: str
    num_classes: int
    args: Dict[str, object] = field(default_factory=dict)   # train.py's args, {} for a bare state_dict


def _strip_wrappers(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def classes_in_state_dict(state: Dict[str, torch.Tensor]) -> Optional[int]:
    """The output size of the last matrix (classifier) weight, if any."""
    weights = [v for k, v in state.items() if k.endswith("weight") and getattr(v, "ndim", 0) >= 2]
    return int(weights[-1].shape[0]) if weights else None


def _signature(state):
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def guess_arch(state: Dict[str, torch.Tensor], num_classes: int, near: str = "",
               budget_s: float = GUESS_SECONDS) -> Optional[str]:
    """The model name whose state_dict has exactly these keys and shapes, trying the project's own
    (few, quick) models first, then the names that share ``near``'s family (letters before the
    digits), then the rest of torchvision's, within ``budget_s`` seconds."""
    from .. import models
    family = near.rstrip("0123456789_").split("_")[0] if near else ""
    names = models.list_models()
    names = sorted(names, key=lambda n: (n not in models.ARCHS, not (family and family in n), n))
    want, start = _signature(state), time.monotonic()
    for name in names:
        if name == near:
            continue
        if time.monotonic() - start > budget_s:
            return None
        try:
            with torch.device("meta"):
                candidate = models.get_model(name, num_classes)
        except Exception:   # models that cannot be built on the meta device
            continue
        if _signature(candidate.state_dict()) == want:
            return name
    return None


def load_checkpoint(path, arch: Optional[str] = None, num_classes: Optional[int] = None) -> Loaded:
    """Build the model of a checkpoint and load its weights (on the CPU).

    ``arch``: required for a bare state_dict; for a train.py checkpoint it must match the recorded
    one.  ``num_classes``: default the checkpoint's (train.py args, else the classifier's size).
    A mismatch raises a one-line UserError naming the file and both architectures.
    """
    from .. import models
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"--checkpoint {path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    args: Dict[str, object] = {}
    if isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        state, args = ckpt["model"], dict(ckpt.get("args") or {})
        recorded = ckpt.get("arch") or args.get("arch")
        if recorded and arch and arch != recorded:
            raise UserError(f"--checkpoint {path}: a {recorded} checkpoint, but --arch {arch} was given; "
                            f"drop --arch or pass --arch {recorded}")
        arch = arch or recorded
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        raise UserError(f"--checkpoint {path}: neither a train.py checkpoint (dict with 'model' and 'arch') "
                        f"nor a state_dict")
    state = _strip_wrappers(state)
    if not arch:
        raise UserError(f"--checkpoint {path}: a bare state_dict records no architecture; pass --arch NAME")
    num_classes = num_classes or args.get("num_classes") or classes_in_state_dict(state)
    if not num_classes:
        raise UserError(f"--checkpoint {path}: cannot tell the number of classes; pass --num-classes N")
    stored = classes_in_state_dict(state)
    if stored and stored != int(num_classes):
        raise UserError(f"--checkpoint {path}: its classifier has {stored} outputs, not {num_classes}; "
                        f"drop --num-classes or fix it")
    try:
        model = models.get_model(arch, int(num_classes))
    except ValueError as e:
        raise UserError(f"--arch {arch}: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        actual = guess_arch(state, int(num_classes), near=arch)
        what = f"holds {actual} weights" if actual else "holds weights of another architecture"
        hint = f"pass --arch {actual}" if actual else "pass the --arch it was trained with"
        raise UserError(f"--checkpoint {path}: {what}, not --arch {arch} ({num_classes} classes); "
                        f"{hint}") from None
    model.eval()
    return Loaded(model=model, arch=arch, num_classes=int(num_classes), args=args)
