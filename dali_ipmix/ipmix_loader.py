"""The public loaders: IPMix training batches and validation batches for your own training loop.

    from dali_ipmix import IPMixLoader, IPMixValLoader
    train = IPMixLoader("/data/imagenet/train", "/data/fractals", batch_size=128)
    val = IPMixValLoader("/data/imagenet/val", batch_size=128)
    for images, labels in train:          # [B*3, 3, 224, 224] (clean, IPMix, IPMix), [B]
        ...
    torch.save({"model": model.state_dict(), "loader": train.state_dict()}, path)
    train.load_state_dict(torch.load(path)["loader"])   # continues with the exact next batch

Each process (rank) gets its own shard of the data set and its own seed.  Rank and world size
come from ``torch.distributed`` when it is initialised, else from torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else one process; the device is the local rank's GPU
(when PyTorch and DALI both see one), else the CPU.  ``train.py`` builds its loaders here too.

``state_dict()`` / ``load_state_dict()`` are the names torchdata's ``StatefulDataLoader`` and
Lightning use (Lightning keeps the state of a train dataloader that has them in its checkpoints):
the state is the DALI checkpoint of every rank (reader position, random states, iterator
counters), so a loader given it continues with the exact next batch.  A state of another world
size, batch size, data set or preset is refused in one line naming what differs.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterator, List, Optional, Tuple, Union

import torch

from . import config as C
from . import sources
from .loader import LAST_BATCH_POLICIES, VIEWS_LAYOUTS, DaliLoader

DTYPES = {"float32": "float", "float": "float", torch.float32: "float",
          "float16": "float16", torch.float16: "float16"}
STATE_FORMAT = "dali_ipmix.IPMixLoader/1"


def _bad(owner: str, name: str, why: str):
    raise ValueError(f"{owner}: {name} {why}")


def ranks_from_env() -> Tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def dali_gpu_count() -> int:
    try:
        from nvidia.dali.backend import GetCUDADeviceCount
        return int(GetCUDADeviceCount())
    except Exception:
        return 0


def resolve_ranks(rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int, int]:
    """(rank, world size, local rank): the arguments when given, else ``torch.distributed`` when it
    is initialised, else torchrun's environment, else (0, 1, 0)."""
    import torch.distributed as dist
    env_rank, env_world, env_local = ranks_from_env()
    if rank is None and world_size is None:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), env_local
        return env_rank, env_world, env_local
    if rank is None or world_size is None:
        raise ValueError("rank and world_size: give both or neither (neither: taken from "
                         "torch.distributed or torchrun's environment)")
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be in 0..{world_size - 1} (world_size {world_size}), got {rank!r}")
    return rank, world_size, env_local if "LOCAL_RANK" in os.environ else rank


def resolve_device(device, local_rank: int) -> Tuple[torch.device, str, Optional[int]]:
    """(torch device, DALI device, DALI device id) for ``device``: "auto" (the local rank's GPU when
    PyTorch and DALI both see one, else the CPU), "cpu", "gpu" / "cuda" (the local rank's GPU),
    "cuda:N" or a ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() and dali_gpu_count() > 0 else "cpu"
    try:
        device = torch.device("cuda" if device == "gpu" else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: use 'auto', 'cpu', 'gpu' or 'cuda:N'") from None
    if device.type == "cpu":
        return device, "cpu", None
    if device.type != "cuda":
        raise ValueError(f"device={str(device)!r}: DALI runs on 'cpu' or 'cuda' devices")
    if not (torch.cuda.is_available() and dali_gpu_count() > 0):
        raise ValueError(f"device={str(device)!r}: no CUDA GPU usable by both PyTorch and DALI here; "
                         "use device='cpu'")
    index = local_rank % torch.cuda.device_count() if device.index is None else device.index
    return torch.device("cuda", index), "gpu", index


def _fingerprint(files: List[str], labels: List[int]) -> str:
    """The data set's identity in a state: its size and a hash of its (relative) files and labels,
    so a data set moved to another folder is the same one."""
    digest = hashlib.sha1("\n".join(f"{f}\t{l}" for f, l in zip(files, labels)).encode()).hexdigest()
    return f"{len(files)} files, sha1 {digest[:12]}"


class _Loader:
    """What the training and validation loaders share: ranks, device, data listing, iteration."""

    _owner = "IPMixLoader"

    def _setup(self, data, *, preset, cfg, batch_size, device, rank, world_size, num_threads,
               dtype, filelist, data_arg="data"):
        owner = self._owner
        if preset not in C.PRESETS:
            _bad(owner, "preset", f"must be one of {', '.join(sorted(C.PRESETS))}, got {preset!r}")
        if cfg is not None and not isinstance(cfg, C.IPMixConfig):
            _bad(owner, "cfg", f"must be a dali_ipmix.IPMixConfig (e.g. dali_ipmix.preset('{preset}', "
                 f"k=2)), got {type(cfg).__name__}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            _bad(owner, "batch_size", f"must be an int >= 1, got {batch_size!r}")
        if not (isinstance(num_threads, int) and num_threads >= 1):
            _bad(owner, "num_threads", f"must be an int >= 1, got {num_threads!r}")
        if dtype != "auto" and dtype not in DTYPES:
            _bad(owner, "dtype", f"must be 'auto', 'float32' or 'float16', got {dtype!r}")
        self.preset, self.cfg = preset, cfg if cfg is not None else C.preset(preset)
        try:
            self.rank, self.world_size, self.local_rank = resolve_ranks(rank, world_size)
            self.device, self.dali_device, self.dali_device_id = resolve_device(device, self.local_rank)
        except ValueError as e:
            raise ValueError(f"{owner}: {e}") from None
        # float16 on the GPU (the model runs under autocast, as in NVIDIA's DALI ResNet-50 examples)
        self.dtype = DTYPES[dtype] if dtype != "auto" else (
            "float16" if self.dali_device == "gpu" else "float")
        self.batch_size, self.num_threads = batch_size, num_threads
        self.data = str(data)
        # the data set listed once (class folders, tar shards, s3://), the graphs are built from it
        self._source = sources.open_source(data, flag=data_arg, filelist=filelist)
        self.classes = list(self._source.classes)
        self.epoch_size = self._source.size
        src = self._source
        self._fingerprint = _fingerprint(*(
            (src.files, src.labels) if src.format == "folders" else     # shards: names and size
            ([os.path.basename(s) for s in src.shards], [src.size] * len(src.shards))))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _where(self) -> dict:
        return dict(num_threads=self.num_threads, dtype=self.dtype, device=self.dali_device,
                    device_id=self.dali_device_id, shard_id=self.rank, num_shards=self.world_size)

    def _dali(self) -> DaliLoader:
        # built on first use, so that a state loaded before (Lightning, train.py) builds it once
        if self._loader is None:
            self._loader = self._build()
        return self._loader

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self._dali())

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return iter(self._dali())


class IPMixLoader(_Loader):
    """IPMix training batches ``(images, labels)`` from DALI, for any training loop.

    Arguments:
      data          folder of class folders (``data/<class>/<image>.jpg``; class i = i-th name sorted)
      mixing        folder of mixing pictures (fractals: ``dali-ipmix fractals --out DIR``)
      preset        "imagenet" (224 px, RandomResizedCrop) or "cifar" (32 px, RandomCrop + padding 4)
      cfg           an ``IPMixConfig`` (default: the preset's; ``dali_ipmix.preset(name, k=..)``)
      batch_size    source images per rank and step (each gives ``cfg.views`` images: 3 with JSD)
      device        "auto" (the local rank's GPU, else the CPU), "cpu", "gpu", "cuda:N"
      rank, world_size   this process's shard (default: torch.distributed, else torchrun's env)
      seed          the run's seed; rank r draws with ``seed + 1000 * r``
      num_threads   DALI CPU threads of this rank
      dtype         "auto" (float16 on the GPU, for autocast; float32 on the CPU), "float32", "float16"
      channels_last images in ``torch.channels_last`` memory format
      views_layout  "sample_major": clean, IPMix, IPMix of sample 0, then of sample 1, ...;
                    "view_major": all clean views, then all first IPMix views, then all second
                    ones (timm's ``JsdCrossEntropy(num_splits=3)``, split batch norm)
      last_batch    "drop" (every rank the same number of full batches), "partial" (each sample
                    once per epoch, the last batch smaller), "fill" (the last batch filled up)
      backend       "fused" (one batch-level operator), "dali" (stock DALI operators), "none"
      crop_scale    smallest RandomResizedCrop area fraction (imagenet preset; default 0.08)
      filelist, mixing_filelist   verified file lists (``dali-ipmix verify --write-filelist``)
      mixing_cache_mb   GPU memory for decoded mixing pictures ("auto": the whole set, <= 4096)

    Yields ``images`` [B * views, 3, S, S] on ``device`` and ``labels`` long [B] (the clean views'
    order).  ``len()``: batches per epoch on this rank; ``classes``, ``num_classes``,
    ``epoch_size`` (images in the whole data set).  A new ``for`` loop starts the next epoch.
    Bad arguments raise one-line errors (ValueError, or ``UserError`` for missing data) before any
    pipeline is built.
    """

    def __init__(self, data, mixing, *, preset: str = "imagenet", cfg: Optional[C.IPMixConfig] = None,
                 batch_size: int, device: Union[str, torch.device] = "auto",
                 rank: Optional[int] = None, world_size: Optional[int] = None, seed: int = 0,
                 num_threads: int = 4, dtype="auto", channels_last: bool = False,
                 views_layout: str = "sample_major", last_batch: str = "drop",
                 backend: str = "fused", crop_scale: Optional[float] = None, filelist=None,
                 mixing_filelist=None, mixing_cache_mb: Union[int, str] = "auto"):
        owner = self._owner
        if views_layout not in VIEWS_LAYOUTS:
            _bad(owner, "views_layout", f"must be one of {', '.join(VIEWS_LAYOUTS)}, got {views_layout!r}")
        if last_batch not in LAST_BATCH_POLICIES:
            _bad(owner, "last_batch", f"must be one of {', '.join(LAST_BATCH_POLICIES)}, got {last_batch!r}")
        if backend not in ("fused", "dali", "none"):
            _bad(owner, "backend", f"must be 'fused', 'dali' or 'none', got {backend!r}")
        if not isinstance(seed, int):
            _bad(owner, "seed", f"must be an int, got {seed!r}")
        if crop_scale is not None and (preset == "cifar" or not 0 < crop_scale <= 1):
            _bad(owner, "crop_scale", f"must be in (0, 1] and needs the imagenet preset (RandomResizedCrop), "
                 f"got {crop_scale!r} with preset {preset!r}")
        self._setup(data, preset=preset, cfg=cfg, batch_size=batch_size, device=device, rank=rank,
                    world_size=world_size, num_threads=num_threads, dtype=dtype, filelist=filelist)
        shard = self.epoch_size // self.world_size
        if batch_size > shard:
            _bad(owner, "batch_size", f"{batch_size} is larger than a shard: {self.epoch_size} images "
                 f"in {data} / {self.world_size} rank(s) = {shard} per rank; lower batch_size")
        self._mixing = sources.open_source(mixing, flag="mixing", filelist=mixing_filelist,
                                           labelled=False)
        self.mixing, self.seed, self.backend = str(mixing), seed, backend
        self.channels_last, self.views_layout, self.last_batch = channels_last, views_layout, last_batch
        self.views = self.cfg.views
        self._pipeline_kw = dict(
            filelist=filelist, mixing_filelist=mixing_filelist, mixing_cache_mb=mixing_cache_mb,
            **({} if crop_scale is None else {"random_area": (crop_scale, 1.0)}))
        self._loader, self._position = None, None

    def _build(self) -> DaliLoader:
        import pipelines
        checkpoint, self._position = self._position, None
        pipe = pipelines.train_pipeline(
            self.preset, self._source, self._mixing, cfg=self.cfg, batch_size=self.batch_size,
            backend=self.backend, seed=self.seed, enable_checkpointing=True, checkpoint=checkpoint,
            **self._pipeline_kw, **self._where())
        return DaliLoader(pipe, last_batch=self.last_batch, device=self.device,
                          channels_last=self.channels_last, views_layout=self.views_layout)

    # -- the state protocol (torchdata's StatefulDataLoader, Lightning) ----------------------

    def _identity(self) -> dict:
        return {"world_size": self.world_size, "batch_size": self.batch_size,
                "data set": self._fingerprint, "preset": self.preset}

    def state_dict(self) -> dict:
        """Where this loader stands: every rank's DALI checkpoint and what they belong to.

        With several ranks and ``torch.distributed`` initialised this is a collective (every rank
        calls it, as Lightning and train.py do) and each rank gets every rank's position, so a state
        saved by rank 0 alone resumes all of them.  Without a process group it holds this rank's.
        """
        import torch.distributed as dist
        own = self._dali().checkpoint()
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            positions = [None] * self.world_size
            dist.all_gather_object(positions, own)
        else:
            positions = [own if r == self.rank else None for r in range(self.world_size)]
        return {"format": STATE_FORMAT, **self._identity(), "positions": positions}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (a ``state_dict()``): the next batch is the one that followed
        when it was taken.  Call it before iterating (the pipeline is built anew at that position
        when the loader is next used)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"{self._owner}.load_state_dict: not a state of this loader (expected "
                             f"a dict from {self._owner}.state_dict(), format {STATE_FORMAT})")
        for key, mine in self._identity().items():
            if state.get(key) != mine:
                raise ValueError(f"{self._owner}.load_state_dict: the state is of {key} "
                                 f"{state.get(key)}, this loader's {key} is {mine}; a state only "
                                 f"resumes the loader it came from")
        position = state["positions"][self.rank]
        if position is None:
            raise ValueError(f"{self._owner}.load_state_dict: the state holds no position of rank "
                             f"{self.rank}; initialise torch.distributed before state_dict() so that it "
                             f"gathers every rank's, or load each rank's own state")
        self._loader, self._position = None, position   # the old pipeline goes before the next is built


class IPMixValLoader(_Loader):
    """Validation batches ``(images, labels)``: resize (256 for a 224 crop; the picture itself for
    CIFAR), center crop, normalise; every image exactly once per epoch across the ranks (the last
    batch of a rank is smaller; a rank's may be empty).

    Arguments as ``IPMixLoader``'s: data, preset, cfg (its image size, mean and std), batch_size,
    device, rank, world_size, num_threads, dtype, channels_last, filelist.  Yields ``images``
    [B, 3, S, S] and ``labels`` long [B]; ``len()``, ``classes``, ``num_classes``, ``epoch_size``.
    """

    _owner = "IPMixValLoader"

    def __init__(self, data, *, preset: str = "imagenet", cfg: Optional[C.IPMixConfig] = None,
                 batch_size: int, device: Union[str, torch.device] = "auto",
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 num_threads: int = 4, dtype="auto", channels_last: bool = False, filelist=None):
        self._setup(data, preset=preset, cfg=cfg, batch_size=batch_size, device=device, rank=rank,
                    world_size=world_size, num_threads=num_threads, dtype=dtype, filelist=filelist)
        self.channels_last, self._filelist, self._loader = channels_last, filelist, None

    def _build(self) -> DaliLoader:
        import pipelines
        from pipelines import imagenet
        pipe = imagenet.val_pipeline(
            self._source, cfg=self.cfg, batch_size=self.batch_size,
            resize=pipelines.resize_for(self.cfg.image_size, self.preset), filelist=self._filelist,
            **self._where())
        return DaliLoader(pipe, last_batch="partial", device=self.device,
                          channels_last=self.channels_last)
