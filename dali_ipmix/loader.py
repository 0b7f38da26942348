"""DALI -> PyTorch: the training/validation pipelines wrapped in ``DALIGenericIterator``.

One pipeline per process (per rank).  Batches come out as torch tensors on the pipeline's device
(zero-copy under DALI's dynamic executor) and are moved to the training device if that differs.
The iterator sizes its epoch from the reader named ``"Reader"`` (``reader_meta``: shard size,
padding), so with ``pad_last_batch=True`` in the reader:

* ``drop``    -- every rank runs the same number of full batches (floor of the smallest shard);
* ``partial`` -- the last batch of each rank is trimmed to the rank's real samples: padded samples
  are never returned, which is what validation needs to count every image exactly once;
* ``fill``    -- the last batch is filled up (with padding / samples of the next epoch).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

LAST_BATCH_POLICIES = ("drop", "partial", "fill")
OUTPUT_MAP = ("images", "labels")


def last_batch_policy(name: str):
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    try:
        return {"drop": LastBatchPolicy.DROP, "partial": LastBatchPolicy.PARTIAL,
                "fill": LastBatchPolicy.FILL}[name]
    except KeyError:
        raise ValueError(f"last-batch policy {name!r}: choose one of {', '.join(LAST_BATCH_POLICIES)}") from None


class DaliLoader:
    """Iterate ``(images, labels)`` from a (not yet built) DALI pipeline with outputs (images, labels).

    images: ``[B, V, 3, S, S]`` training views are returned flattened sample-major as ``[B*V, 3, S, S]``
    (``flatten_views=True``: clean, aug1, aug2 of sample 0, then of sample 1, ...) or as is;
    ``[B, 3, S, S]`` validation images are returned as is.  labels: ``long [B]``.
    ``device``: torch device the tensors must end up on (``None``: wherever DALI put them).
    ``channels_last``: return images in ``torch.channels_last`` memory format.
    The epoch ends with ``StopIteration``; the iterator resets itself (``auto_reset``), so a new
    ``for`` loop starts the next epoch.  ``checkpoint()`` is the pipeline+iterator state to store;
    a pipeline rebuilt with ``checkpoint=`` that state continues with the next batch.
    """

    def __init__(self, pipe, *, last_batch: str = "drop", device: Optional[torch.device] = None,
                 channels_last: bool = False, flatten_views: bool = True, reader_name: str = "Reader",
                 extra_outputs: Tuple[str, ...] = ()):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
        self.pipe = pipe
        self.device = None if device is None else torch.device(device)
        self.channels_last = channels_last
        self.flatten_views = flatten_views
        self.last_batch = last_batch
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

    def _convert(self, out) -> Tuple[torch.Tensor, torch.Tensor]:
        images, labels = out["images"], out["labels"]
        if images.dim() == 5 and self.flatten_views:
            images = images.flatten(0, 1)
        labels = labels.reshape(-1).long()
        if self.device is not None and images.device != self.device:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def checkpoint(self) -> str:
        """The serialized DALI checkpoint (reader positions, RNG states, iterator counters)."""
        return self.iterator.checkpoints()[0]
