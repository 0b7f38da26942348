"""``RunState``: what a train.py run derives from its flags and finds on its way -- ranks and
devices, the data's size, the output folder's lock, where training stands, the writes that
failed -- kept apart from the frozen ``run_config.RunConfig``, which holds the flags as resolved
(defaults filled in, the data sources, the output folder); and ``Model``, the one holder of the
run's model and its wrappers (docs/architecture.md "Who owns which fact")."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import IO, List, Optional

import torch
import torch.nn as nn

from .metrics import FailedWrites
from .run_config import RunConfig


@dataclass(frozen=True)
class Model:
    """The run's model, built once by train.py's ``create_model``: the network and what wraps it."""
    net: nn.Module           # the bare network: what checkpoints hold
    # ``net``, behind the normalisation layer in the adversarial modes (DDP's name for what it
    # wraps): the optimizer's parameters; evaluation and attacks call it (no DDP collectives)
    module: nn.Module
    # ``module``, in DDP and/or torch.compile where the run asks: what the training step calls
    step: nn.Module
    input: dict              # what ``module`` takes, recorded for `dali-ipmix eval`


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

    def recorded_args(self, flags: RunConfig) -> dict:
        """The "args" entry of a checkpoint: the flags and the run's facts that are plain values."""
        return {**flags.plain_values(), **{k: getattr(self, k) for k in self.RECORDED}}

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
