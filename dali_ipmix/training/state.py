"""``RunState``: what a train.py run derives from its flags and finds on its way -- ranks and
devices, the data's size, the output folder's lock, the models, where training stands, the writes
that failed -- kept apart from ``args``, which holds the flags as resolved (defaults filled in, the
demo's data folders, ``--preset cifar-adv`` split into ``preset`` and ``recipe``)
(docs/architecture.md "Who owns which fact")."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import IO, List, Optional

import torch
import torch.nn as nn

from .metrics import FailedWrites

_SCALARS = (int, float, str, bool, type(None))


@dataclass
class RunState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    demo: bool = False                  # no data flags: the built-in demo
    torch_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dali_device: str = "cpu"
    dali_device_id: Optional[int] = None
    num_classes: int = 0
    num_train: int = 0
    num_val: int = 0
    output_lock: Optional[IO] = None    # held while the run lives (checkpoint.lock_output_dir)
    made_output_dir: bool = False       # this run created --output-dir (so may remove it empty)
    previous_run: List[str] = field(default_factory=list)   # what --overwrite deletes
    net: Optional[nn.Module] = None     # the bare network: what checkpoints hold
    # ``net``, behind the normalisation layer in the adversarial modes (torchvision's name):
    # evaluation and attacks call it (no DDP collectives); the training step calls its DDP /
    # compiled wrapper
    model_without_ddp: Optional[nn.Module] = None
    input: dict = field(default_factory=dict)    # what that model takes, for `dali-ipmix eval`
    step: int = 0                       # optimizer steps done
    best_top1: float = 0.0
    history: list = field(default_factory=list)  # epoch and robust records, kept in checkpoints
    last_checkpoint: Optional[str] = None
    # the newest checkpoint write failed (disk full): the state the run ends in is not on disk
    checkpoint_failed: bool = False
    failed_writes: FailedWrites = field(default_factory=FailedWrites)

    # recorded in checkpoints beside the flags (``dali-ipmix eval`` reads num_classes)
    RECORDED = ("rank", "world_size", "local_rank", "distributed", "demo", "dali_device",
                "dali_device_id", "num_classes", "num_train", "num_val")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, *msg):
        if self.is_main:
            print(*msg, flush=True)

    def recorded_args(self, args) -> dict:
        """The "args" entry of a checkpoint: the flags and the run's facts that are plain values."""
        flags = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in vars(args).items()
                 if isinstance(v, (*_SCALARS, os.PathLike))}   # data sources: their location
        return {**flags, **{k: getattr(self, k) for k in self.RECORDED}}

    def release(self):
        """Unlock the output folder (the kernel would at exit; a test runs many runs in one process)."""
        if self.output_lock is not None:
            lock = self.output_lock.name
            self.output_lock.close()
            self.output_lock = None
            folder = os.path.dirname(lock)
            if self.made_output_dir and os.listdir(folder) == [os.path.basename(lock)]:
                os.unlink(lock)       # a start that failed leaves no folder holding only the lock
                os.rmdir(folder)
