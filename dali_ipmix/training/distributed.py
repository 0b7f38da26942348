"""The ranks of a torchrun run: who they are, their devices, sums over them, objects passed between
them, failing together on a user error, and a SIGTERM / Ctrl-C stop that every rank takes after the
same step (README "Training": shards and seeds, Checkpoints)."""
from __future__ import annotations

import signal
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ..errors import UserError
from ..ipmix_loader import ranks_from_env, resolve_device  # noqa: F401  (train.py: ranks_from_env)


def pick_device(want: str, local_rank: int) -> Tuple[torch.device, str, Optional[int]]:
    """(torch device, DALI device, DALI device id) of this rank for ``--device`` (the loaders' rule,
    ``ipmix_loader.resolve_device``: auto is a GPU when both PyTorch and DALI can use one, GPU
    ``local_rank`` modulo the count); a GPU rank makes its GPU the current one."""
    try:
        device, dali_device, device_id = resolve_device(want, local_rank)
    except ValueError:
        raise UserError("--device gpu: no CUDA GPU usable by both PyTorch and DALI here; use --device cpu") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, dali_device, device_id


def init(device: torch.device):
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def close():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values, device) -> List[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather(obj, world_size: int) -> list:
    """Every rank's ``obj``, in rank order (a collective: every rank calls it)."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(values: list, world_size: int) -> list:
    """Rank 0's ``values`` on every rank."""
    if world_size > 1:
        dist.broadcast_object_list(values, src=0)
    return values


def broadcast_buffers(module: torch.nn.Module, world_size: int):
    """Rank 0's buffers (BatchNorm running statistics) on every rank, so that an evaluation split
    over the ranks measures one model -- the one rank 0 saves.  Without --sync-bn each rank's
    statistics follow its own batches (DDP copies rank 0's only at the start of a forward)."""
    if world_size > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def raise_together(error, world_size: int):
    """Raise on every rank when one rank found a user error, so that none is left waiting in a
    collective for a rank that has quit."""
    if world_size == 1:
        if error:
            raise error
        return
    for message in all_gather(str(error) if error else None, world_size):
        if message:
            raise UserError(message)


class StopRequest:
    """SIGTERM / SIGINT ask the loop to stop after the current step (a second Ctrl-C stops at once).

    With several ranks a signal may reach them at different steps, and checkpointing is collective,
    so the flags are OR-reduced over a gloo group: the reduction started after step s is read after
    step s + 1 (no stall waiting for it), and every rank stops after the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, distributed: bool):
        self.signum = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        self._group = dist.new_group(backend="gloo") if distributed else None
        self._pending = None

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def should_stop(self) -> bool:
        if self._group is None:
            return self.signum is not None
        reduced = 0    # the largest signal number any rank had after the previous step
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            reduced = int(flag.item())
        flag = torch.tensor([0 if self.signum is None else int(self.signum)], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group,
                                         async_op=True), flag)
        if reduced and self.signum is None:
            self.signum = reduced     # a rank the signal did not reach reports the others' signal
        return bool(reduced)

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "signal"

    def close(self):
        if self._pending is not None:
            self._pending[0].wait()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
