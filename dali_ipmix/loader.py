"""DALI -> PyTorch: the training/validation pipelines wrapped in ``DALIGenericIterator``.

One pipeline per process (per rank).  DALI's iterator hands out its outputs without a copy
(``torch.from_dlpack`` under DALI's dynamic executor); ``DaliLoader`` then gives the consumer
tensors of its own (``StreamHandoff``, below), on the training device.
The iterator sizes its epoch from the reader named ``"Reader"`` (``reader_meta``: shard size,
padding), so with ``pad_last_batch=True`` in the reader:

* ``drop``    -- every rank runs the same number of full batches (floor of the smallest shard);
* ``partial`` -- the last batch of each rank is trimmed to the rank's real samples: padded samples
  are never returned, which is what validation needs to count every image exactly once;
* ``fill``    -- the last batch is filled up (with padding / samples of the next epoch).

Why a batch is copied once on the GPU (docs/architecture.md, "A batch's memory"): the memory
DALI exports is DALI's -- its own buffers, or the fused node's views, allocated by torch on
DALI's stream and adopted by DALI.  When the consumer drops such a tensor, the memory goes back
to a pool ordered on DALI's stream only; nothing orders its reuse after the reads the training
stream still has queued (DALI 2.4's ``__dlpack__`` makes the consumer wait for the data, not
the free for the consumer), so a later batch could overwrite it while the model still reads it.
"""
from __future__ import annotations

import contextlib
from collections import deque
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch

LAST_BATCH_POLICIES = ("drop", "partial", "fill")
OUTPUT_MAP = ("images", "labels")
VIEWS_LAYOUTS = ("sample_major", "view_major")
MAX_PENDING = 8     # batches whose sources may wait for their copies before the host waits


def last_batch_policy(name: str):
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    try:
        return {"drop": LastBatchPolicy.DROP, "partial": LastBatchPolicy.PARTIAL,
                "fill": LastBatchPolicy.FILL}[name]
    except KeyError:
        raise ValueError(f"last-batch policy {name!r}: choose one of {', '.join(LAST_BATCH_POLICIES)}") from None


class StreamHandoff:
    """Moves tensors out of producer-owned GPU memory into the consumer's own, safely.

    ``handoff(sources, convert)``: ``convert(*sources)`` must return NEW tensors (copies made on
    the current stream); they are allocated by torch's caching allocator on the consumer's
    current stream, so torch's usual rules protect them (reuse ordered after that stream's work;
    ``record_stream`` for other streams) however long the consumer keeps them.  The sources are
    kept alive until an event recorded after the copy has completed, so the producer cannot
    reuse their memory while the copy still reads it.  At most ``max_pending`` batches wait:
    beyond that the host waits for the oldest copy (a consumer stream that far behind).
    ``event``: the event factory (``torch.cuda.Event``; tests pass a stand-in).
    """

    def __init__(self, max_pending: int = MAX_PENDING, event: Optional[Callable] = None):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_pending = max_pending
        self.event = event or torch.cuda.Event
        self.pending = deque()           # (event, sources) of copies that may still be running

    def __call__(self, sources: Sequence[torch.Tensor], convert: Callable) -> tuple:
        out = convert(*sources)
        for src, new in zip(sources, out):
            if new.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
                raise RuntimeError("StreamHandoff: convert returned a view of its source; it must copy")
        done = self.event()
        done.record()                    # on the current stream, after the copies
        self.pending.append((done, tuple(sources)))
        self.release()
        return out

    def release(self) -> None:
        """Drop the sources whose copies have completed; wait for the oldest beyond the bound."""
        while self.pending and (len(self.pending) > self.max_pending or self.pending[0][0].query()):
            done, _ = self.pending[0]
            done.synchronize()
            self.pending.popleft()

    def wait_all(self) -> None:
        while self.pending:
            self.pending.popleft()[0].synchronize()

    def __del__(self):
        try:
            self.wait_all()
        except Exception:                # interpreter shutdown, a CUDA context already gone
            pass


class DaliLoader:
    """Iterate ``(images, labels)`` from a (not yet built) DALI pipeline with outputs (images, labels).

    images: ``[B, V, 3, S, S]`` training views are returned flattened to ``[B*V, 3, S, S]``,
    ``views_layout="sample_major"`` (clean, aug1, aug2 of sample 0, then of sample 1, ...) or
    ``"view_major"`` (all clean views, then all first IPMix views, ...), or as is (``None``);
    ``[B, 3, S, S]`` validation images are returned as is.  labels: ``long [B]``.
    ``device``: torch device the tensors must end up on (``None``: wherever DALI put them).
    ``channels_last``: return images in ``torch.channels_last`` memory format.
    The epoch ends with ``StopIteration``; the iterator resets itself (``auto_reset``), so a new
    ``for`` loop starts the next epoch.  ``checkpoint()`` is the pipeline+iterator state to store;
    a pipeline rebuilt with ``checkpoint=`` that state continues with the next batch.

    GPU batches are the consumer's own memory: images and labels are copied once, on the
    current CUDA stream, out of DALI's memory (with ``channels_last`` that copy is the layout
    conversion), and DALI's buffers are released only when the copy is done (``handoff``, a
    :class:`StreamHandoff`).  A batch may then be kept as long as wanted, and read on the
    current stream without any care; to read it on another stream, ``record_stream`` it as
    with any torch tensor.  CPU batches are not copied (nothing runs asynchronously there)
    unless a ``handoff`` is given (tests use that to run the GPU path's logic on the CPU).
    """

    def __init__(self, pipe, *, last_batch: str = "drop", device: Optional[torch.device] = None,
                 channels_last: bool = False, views_layout: Optional[str] = "sample_major",
                 reader_name: str = "Reader",
                 extra_outputs: Tuple[str, ...] = (), handoff: Optional[StreamHandoff] = None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
        self.pipe = pipe
        self.device = None if device is None else torch.device(device)
        self.channels_last = channels_last
        if views_layout not in VIEWS_LAYOUTS + (None,):
            raise ValueError(f"views_layout {views_layout!r}: choose one of {', '.join(VIEWS_LAYOUTS)} "
                             f"or None")
        self.views_layout = views_layout
        self.last_batch = last_batch
        self.handoff = handoff
        # extra outputs (e.g. a benchmark's draws) are made by the pipeline and dropped here
        self.iterator = DALIGenericIterator([pipe], list(OUTPUT_MAP + tuple(extra_outputs)),
                                            reader_name=reader_name,
                                            last_batch_policy=last_batch_policy(last_batch),
                                            auto_reset=True)

    def __len__(self) -> int:
        """Batches in the current epoch (per rank)."""
        return len(self.iterator)

    @property
    def batch_size(self) -> int:
        return self.iterator.batch_size

    def epoch_size(self) -> int:
        """Samples in the whole (unsharded, unpadded) data set."""
        return int(self.pipe.reader_meta("Reader")["epoch_size"])

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.iterator:
            yield self._convert(batch[0])

    def _shape(self, images: torch.Tensor, labels: torch.Tensor):
        """Views in the wanted order, still ``[B, V, ...]`` or ``[V, B, ...]`` (a view, no copy:
        the flattening copy is the one the batch gets anyway)."""
        if images.dim() == 5 and self.views_layout == "view_major":
            images = images.transpose(0, 1)
        return images, labels.reshape(-1)

    def _flattened(self, images: torch.Tensor, device) -> torch.Tensor:
        """One copy of ``images`` on ``device`` with the views flattened into the batch and in the
        wanted memory format."""
        flat = images.dim() == 5 and self.views_layout is not None
        fmt = torch.channels_last if self.channels_last and (flat or images.dim() == 4) \
            else torch.contiguous_format
        if not flat:
            return images.to(device, non_blocking=True, copy=True, memory_format=fmt)
        out = torch.empty((images.shape[0] * images.shape[1],) + tuple(images.shape[2:]),
                          dtype=images.dtype, device=device, memory_format=fmt)
        out.unflatten(0, images.shape[:2]).copy_(images, non_blocking=True)
        return out

    def _owned(self, images: torch.Tensor, labels: torch.Tensor):
        """New tensors on ``self.device`` in the wanted layout, copied on the current stream."""
        device = self.device or images.device
        return (self._flattened(images, device),
                labels.to(device, torch.long, non_blocking=True, copy=True))

    def _convert(self, out) -> Tuple[torch.Tensor, torch.Tensor]:
        images, labels = self._shape(out["images"], out["labels"])
        if self.handoff is None and (images.is_cuda or labels.is_cuda):
            self.handoff = StreamHandoff()
        if self.handoff is not None:
            where = images if images.is_cuda else labels
            with torch.cuda.device(where.device) if where.is_cuda else contextlib.nullcontext():
                return self.handoff((images, labels), self._owned)
        labels = labels.long()
        if images.dim() == 5 and self.views_layout is not None:
            images = images.flatten(0, 1)      # a copy only where view-major needs one
        if self.device is not None and images.device != self.device:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def checkpoint(self) -> str:
        """The serialized DALI checkpoint (reader positions, RNG states, iterator counters)."""
        return self.iterator.checkpoints()[0]
