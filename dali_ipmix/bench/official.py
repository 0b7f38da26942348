"""The official IPMix code (github.com/hzlsaber/IPMix) as a bench contender, read from the user's
checkout at run time -- never copied into this project.

Its ``imagenet.py`` parses command-line arguments at import time, so the pieces the data loader
needs -- ``ipmix``, ``augment_input`` and ``IPMixDataset`` -- are lifted out of the module's syntax
tree and executed alone, with the ``args`` they read (k, t, beta, aug_severity, all_ops: the
ImageNet defaults).  ``IPMix_utils.py`` is imported as the module it is.  The loader is then built
as the official ``main()`` builds it: ``ImageFolder`` + RandomResizedCrop + flip for the sources,
``ImageFolder`` + Resize(256) + RandomCrop for the mixing set, ToTensor + Normalize, shuffling,
pinned memory and its worker seeding (a NumPy reseed from ``torch.initial_seed()``).  One
difference: the mixing pictures are the files the DALI rows read (``PictureSet``), where the
official code needs them in a class sub-folder for ``ImageFolder``.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import torch

from dali_ipmix import config as C
from dali_ipmix.errors import UserError

NEEDED = ("ipmix", "augment_input", "IPMixDataset")
OFFICIAL_SIZE = 224          # its ipmix() hard-codes patch sizes up to 224


def load(path) -> SimpleNamespace:
    """``ipmix``, ``augment_input``, ``IPMixDataset`` and the ``IPMix_utils`` module of the
    official checkout at ``path`` (the folder holding ``imagenet.py`` and ``IPMix_utils.py``)."""
    root = Path(path)
    script, utils_file = root / "imagenet.py", root / "IPMix_utils.py"
    if not script.is_file() or not utils_file.is_file():
        raise UserError(f"--official {path}: not a checkout of the official IPMix code (needs "
                        f"imagenet.py and IPMix_utils.py, as in github.com/hzlsaber/IPMix)")
    tree = ast.parse(script.read_text(), filename=str(script))
    found = {node.name: node for node in tree.body
             if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in NEEDED}
    missing = [n for n in NEEDED if n not in found]
    if missing:
        raise UserError(f"--official {path}: imagenet.py defines no {', '.join(missing)}; "
                        f"expected the official code (commit 050bcb6 or later)")
    spec = importlib.util.spec_from_file_location("IPMix_utils", utils_file)
    utils = importlib.util.module_from_spec(spec)
    sys.modules["IPMix_utils"] = utils       # DataLoader workers unpickle the ops by module name
    spec.loader.exec_module(utils)
    utils.IMAGE_SIZE = OFFICIAL_SIZE
    cfg = C.IMAGENET
    module = ModuleType("ipmix_official")
    module.__dict__.update(np=np, random=random, torch=torch, utils=utils, args=argparse.Namespace(
        k=cfg.k, t=cfg.t, beta=cfg.beta, aug_severity=cfg.severity, all_ops=cfg.all_ops))
    code = compile(ast.Module(body=[found[n] for n in NEEDED], type_ignores=[]), str(script), "exec")
    exec(code, module.__dict__)
    sys.modules[module.__name__] = module     # its classes must pickle into spawned workers
    return SimpleNamespace(utils=utils, module=module,
                           **{n: getattr(module, n) for n in NEEDED})


def _seed_worker(worker_id: int) -> None:
    # the official loader's worker_init_fn: every worker reseeds NumPy from its torch seed
    ss = np.random.SeedSequence([torch.initial_seed()])
    np.random.seed(ss.generate_state(4))


class PictureSet(torch.utils.data.Dataset):
    """What the official code gets from ``ImageFolder(mixing_set)``, (picture, 0) pairs, but over
    the same picture files the DALI rows read (a flat folder works too; labels are unused)."""

    def __init__(self, root, files, transform):
        self.paths = [str(Path(root, f)) for f in files]
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from torchvision.datasets.folder import default_loader
        return self.transform(default_loader(self.paths[i])), 0


def dataset(official: SimpleNamespace, train_dir, mixing_dir, jsd: bool, mixing_files=None):
    """The official ``IPMixDataset`` over ``train_dir`` with pictures from ``mixing_dir``
    (``mixing_files``: relative paths, default every picture below it)."""
    from torchvision import datasets, transforms
    from dali_ipmix.readers import picture_files
    train = datasets.ImageFolder(str(train_dir), transform=transforms.Compose(
        [transforms.RandomResizedCrop(OFFICIAL_SIZE), transforms.RandomHorizontalFlip()]))
    mixing = PictureSet(mixing_dir, mixing_files or picture_files(mixing_dir), transforms.Compose(
        [transforms.Resize(256), transforms.RandomCrop(OFFICIAL_SIZE)]))
    preprocess = transforms.Compose([transforms.ToTensor(),
                                     transforms.Normalize(C.IMAGENET_MEAN, C.IMAGENET_STD)])
    return official.IPMixDataset(train, mixing, preprocess, no_jsd=not jsd)


def loader(official: SimpleNamespace, train_dir, mixing_dir, *, jsd: bool, batch_size: int,
           workers: int, pin_memory: bool, sampler=None, prefetch_factor=2, mixing_files=None):
    """The official training DataLoader (``shuffle=True`` unless a ``sampler`` is given)."""
    ds = dataset(official, train_dir, mixing_dir, jsd, mixing_files)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, num_workers=workers,
        pin_memory=pin_memory, worker_init_fn=_seed_worker, drop_last=True,
        prefetch_factor=prefetch_factor if workers else None)


def as_views(batch_images, jsd: bool) -> torch.Tensor:
    """The official batch ([B, 3, S, S], or a list of the 3 JSD views) as [B, V, 3, S, S]."""
    if jsd:
        return torch.stack(list(batch_images), 1)
    return batch_images.unsqueeze(1)
