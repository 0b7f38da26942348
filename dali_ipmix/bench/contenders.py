"""One function per contender: build it, warm it up, time its batches, free it.

Each returns ``{"seconds", "iters", "warmup", "cpu_s", "setup_s"}``: ``seconds`` covers exactly
``iters`` batches of ``batch_size`` source images after ``warmup`` untimed ones, with CUDA
synchronised before the clock starts and before it stops; ``iters`` is at least ``--iters`` and
the window at least ``--min-seconds`` long (a DataLoader row adds whole rounds of its workers,
see :func:`whole_rounds`); ``cpu_s`` is the CPU time this process and its worker processes spent
over that window (read just outside it, so nothing runs between the sync and the clock);
``setup_s`` is the time from the start of the contender to its first batch (pipeline build,
worker start-up, kernel compilation, the model's first step).
The warm-up is ``--warmup`` batches plus the loader's prefetch queue (DALI
``prefetch_queue_depth``, the DataLoader's ``prefetch_factor * workers``): the batches made
during set-up are drained and the queue refilled while the loader runs at its pace, so the timed
window starts and ends in the same steady state and never counts set-up work as its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Dict, Iterator, Optional

import numpy as np
import torch

from dali_ipmix import config as C
from dali_ipmix.bench.data import BenchData

DALI_PREFETCH = 2          # the pipelines' default prefetch_queue_depth
LOADER_PREFETCH = 2        # torch DataLoader's default prefetch_factor
ENDLESS_SAMPLES = 2 ** 40  # a DataLoader row's sampler length: more than any run takes
# Optimiser of train.py / the official code (SGD, Nesterov momentum); values do not change speed.
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


@dataclass(frozen=True)
class Setup:
    """What every contender shares in one run."""
    data: BenchData
    cfg: C.IPMixConfig            # the training config (JSD triple) at --image-size
    batch_size: int
    warmup: int
    iters: int                    # at least this many timed batches ...
    device: str                   # "cpu" or "gpu" (DALI and PyTorch alike)
    backend: str                  # IPMix backend of the dali-ipmix and train rows
    hw_decoder_load: float
    arch: str
    amp: str                      # "off", "bf16" or "fp16"
    channels_last: bool
    seed: int
    official: Optional[str] = None   # checkout of the official IPMix code (the official rows)
    min_seconds: float = 0.0      # ... over a window at least this long

    @property
    def loader_dtype(self) -> str:
        """The views' dtype: float16 under mixed precision on GPU (what train.py loads), else
        float32."""
        return "float16" if self.device == "gpu" and self.amp in ("bf16", "fp16") else "float"

    @property
    def resize(self) -> int:
        """Shorter side of the mixing picture before its random crop: Resize(256) for 224."""
        from pipelines import resize_for
        return resize_for(self.cfg.image_size, "imagenet")

    @cached_property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.device == "gpu" \
            else torch.device("cpu")

    def sync(self) -> None:
        if self.device == "gpu":
            torch.cuda.synchronize()


def whole_rounds(iters: int, workers: int) -> int:
    """``iters`` rounded up to a multiple of ``workers``: the batches a DataLoader row times.

    A DataLoader hands batch i to worker ``i % workers``, and its workers make their batches side
    by side, so batches arrive in bursts of up to ``workers``.  A window that is not a whole number
    of rounds ends inside a burst whose batches were mostly made before the clock started: with
    16 workers and 10 timed batches it read up to 4x too fast.  Over whole rounds the window runs
    from one batch of a worker to a later batch of the same worker, which is its true pace."""
    return -(-iters // workers) * workers


def cpu_seconds() -> Dict[int, float]:
    """CPU seconds (user + system) so far of this process and of each of its live descendants (the
    DataLoader workers), by process id."""
    import psutil
    out = {}
    for proc in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system
        except psutil.Error:          # a process that ended meanwhile
            pass
    return out


def timed(setup: Setup, start: float, next_batch: Callable, consume: Callable,
          extra_warmup: int = 0, iters: Optional[int] = None, round_size: int = 1) -> dict:
    """Time at least ``iters`` (default ``setup.iters``) batches over at least
    ``setup.min_seconds``, in steps of ``round_size`` batches, after ``setup.warmup +
    extra_warmup`` untimed ones; ``start``: when the contender began (``time.perf_counter()``),
    for ``setup_s``."""
    iters = setup.iters if iters is None else iters
    warmup = setup.warmup + extra_warmup
    first = None
    for _ in range(warmup):
        consume(next_batch())
        if first is None:
            setup.sync()
            first = time.perf_counter()
    cpu_start = cpu_seconds()           # before the sync: nothing between it and the clock
    setup.sync()
    timed_start = time.perf_counter()
    done = 0
    while done < iters or time.perf_counter() - timed_start < setup.min_seconds:
        for _ in range(round_size):
            consume(next_batch())
        done += round_size
    setup.sync()
    end = time.perf_counter()
    cpu_end = cpu_seconds()
    cpu = sum(t - cpu_start[pid] for pid, t in cpu_end.items() if pid in cpu_start) + \
        sum(t for pid, t in cpu_end.items() if pid not in cpu_start)
    return {"seconds": end - timed_start, "iters": done, "warmup": warmup, "cpu_s": cpu,
            "processes": len(set(cpu_start) | set(cpu_end)),
            "setup_s": (first or timed_start) - start}


def endless(loader) -> Iterator:
    """Batches of ``loader`` across epoch ends (small sets run many epochs)."""
    while True:
        got = 0
        for batch in loader:
            got += 1
            yield batch
        if not got:
            raise RuntimeError("the loader gave no batch in a whole epoch")


def touch(batch) -> None:
    """Consume a loader batch without work (the loader-only rows)."""


# ---------------------------------------------------------------------------------------------
# DALI rows: dali-plain, dali-ipmix, dali-ipmix-jsd.

def dali_loader(setup: Setup, threads: int, cfg: C.IPMixConfig, backend: str,
                channels_last: bool = False, draws: Optional[str] = None):
    import pipelines
    from dali_ipmix.loader import DaliLoader
    pipe = pipelines.train_pipeline(
        "imagenet", setup.data.train_dir, setup.data.mixing_dir, cfg=cfg,
        batch_size=setup.batch_size, num_threads=threads, device=setup.device, backend=backend,
        seed=setup.seed, hw_decoder_load=setup.hw_decoder_load, prefetch_queue_depth=DALI_PREFETCH,
        filelist=setup.data.train_filelist, mixing_filelist=setup.data.mixing_filelist,
        draws=draws, dtype=setup.loader_dtype)
    # "fill": a set smaller than a batch still gives full batches (wrapping into the next epoch).
    return DaliLoader(pipe, last_batch="fill", device=setup.torch_device, channels_last=channels_last,
                      extra_outputs=("draws",) if draws else ())


def dali_pipeline(setup: Setup, threads: int, *, jsd: bool, backend: Optional[str] = None,
                  draws: Optional[str] = None) -> dict:
    """The DALI training pipeline alone (decode, crop, flip, IPMix on ``backend`` -- default the
    run's -- and normalise; ``backend="none"``: no IPMix, the ceiling).  ``draws`` ("tapes" or
    "uniforms", with backend "none"): the graph also makes each view's random draws, decoded into
    tapes by DALI operators or raw, with no pixel work -- what the draws alone cost."""
    start = time.perf_counter()
    loader = dali_loader(setup, threads, setup.cfg.replace(jsd=jsd), backend or setup.backend,
                         draws=draws)
    batches = endless(loader)
    result = timed(setup, start, lambda: next(batches), touch, extra_warmup=DALI_PREFETCH)
    del batches, loader
    return result


def read_pipeline(setup: Setup, threads: int):
    """A built DALI pipeline giving (encoded pictures, labels) of the training data as the
    training pipeline reads them (shuffled, from class folders, shards or ``s3://``)."""
    from nvidia.dali import pipeline_def
    from dali_ipmix import readers
    source = setup.data.train_dir

    @pipeline_def(batch_size=setup.batch_size, num_threads=threads, device_id=None,
                  prefetch_queue_depth=DALI_PREFETCH, seed=setup.seed)
    def read():
        return source.reader(name=readers.TRAIN_READER, shuffle=True, seed=setup.seed)

    pipe = read()
    pipe.build()
    return pipe


def read_alone(setup: Setup, threads: int) -> dict:
    """The training data's reader alone, nothing decoded: what the data source can deliver, the
    ceiling of every other DALI row on that storage (the dali-read row)."""
    start = time.perf_counter()
    pipe = read_pipeline(setup, threads)
    result = timed(setup, start, pipe.run, touch, extra_warmup=DALI_PREFETCH)
    del pipe
    return result


# ---------------------------------------------------------------------------------------------
# The reference row: the official recipe (torch DataLoader + PIL + NumPy IPMix).

def _pil_load(path: str):
    from PIL import Image
    try:
        with open(path, "rb") as fh:                 # what torchvision's ImageFolder does
            return Image.open(fh).convert("RGB")
    except (OSError, ValueError) as e:   # PIL's messages rarely name the file
        raise RuntimeError(f"PIL could not read {path}\n({type(e).__name__}: {e})") from None


class ReferenceDataset(torch.utils.data.Dataset):
    """The official IPMixDataset: PIL decode, RandomResizedCrop + flip of the source, a random
    mixing picture with Resize + RandomCrop, then the NumPy/PIL IPMix (``reference.ipmix_views``)
    with tapes from ``tape.sample``.  Returns ([V, 3, S, S] float32 normalised views, label)."""

    def __init__(self, data: BenchData, cfg: C.IPMixConfig, resize: int):
        from torchvision import transforms
        files, self.labels = data.train_files()
        self.paths = [str(data.train_dir / f) for f in files]
        self.pictures = [str(data.mixing_dir / p) for p in data.mixing_files()]
        self.cfg = cfg
        self.source = transforms.Compose([transforms.RandomResizedCrop(cfg.image_size),
                                          transforms.RandomHorizontalFlip()])
        self.mixing = transforms.Compose([transforms.Resize(resize),
                                          transforms.RandomCrop(cfg.image_size)])
        self._rng = None

    def __len__(self) -> int:
        return len(self.paths)

    def rng(self) -> np.random.Generator:
        # Made lazily in each worker: torch gives every worker its own initial seed.
        if self._rng is None:
            self._rng = np.random.default_rng(torch.initial_seed())
        return self._rng

    def __getitem__(self, i):
        from dali_ipmix import reference as R
        from dali_ipmix import tape as T
        rng = self.rng()
        x = np.asarray(self.source(_pil_load(self.paths[i])))
        f = np.asarray(self.mixing(_pil_load(self.pictures[rng.integers(len(self.pictures))])))
        tapes = T.sample(rng, self.cfg, self.cfg.n_aug)
        return torch.from_numpy(R.ipmix_views(x, f, tapes, self.cfg)), self.labels[i]


def _loader_sampler(setup: Setup, threads: int, n_files: int):
    """(sampler, timed batches, batches prefetched) for a DataLoader of ``threads`` workers: shuffled
    with replacement and (drawn lazily) practically endless, so that neither a small set nor
    ``--min-seconds`` ends the measurement early and no epoch end restarts the workers."""
    from torch.utils.data import RandomSampler
    ahead = LOADER_PREFETCH * threads
    iters = whole_rounds(setup.iters, threads)
    sampler = RandomSampler(range(n_files), replacement=True, num_samples=ENDLESS_SAMPLES,
                            generator=torch.Generator().manual_seed(setup.seed))
    return sampler, iters, ahead


def _time_loader(setup: Setup, start: float, loader, iters: int, ahead: int,
                 workers: int) -> dict:
    """Times ``loader``'s batches; on GPU each batch (its images: one tensor or a list of views,
    and its labels) is copied to the device from pinned memory, as a training loop does."""
    batches = iter(loader)
    device = setup.torch_device

    def to_device(batch):
        images, labels = batch
        for t in (images if isinstance(images, (list, tuple)) else [images]):
            t.to(device, non_blocking=True)
        labels.to(device, non_blocking=True)

    result = timed(setup, start, lambda: next(batches), to_device, extra_warmup=ahead, iters=iters,
                   round_size=workers)
    del batches, loader
    return result


def reference_pipeline(setup: Setup, threads: int, *, jsd: bool) -> dict:
    """``threads`` DataLoader worker processes running :class:`ReferenceDataset`."""
    from torch.utils.data import DataLoader
    start = time.perf_counter()
    dataset = ReferenceDataset(setup.data, setup.cfg.replace(jsd=jsd), setup.resize)
    sampler, iters, ahead = _loader_sampler(setup, threads, len(dataset))
    loader = DataLoader(dataset, batch_size=setup.batch_size, num_workers=threads, drop_last=True,
                        sampler=sampler, prefetch_factor=LOADER_PREFETCH,
                        pin_memory=setup.device == "gpu")
    return _time_loader(setup, start, loader, iters, ahead, threads)


def official_pipeline(setup: Setup, threads: int, *, jsd: bool) -> dict:
    """The official code's own DataLoader (``--official`` checkout) with ``threads`` workers, on
    the same files."""
    from dali_ipmix.bench import official as O
    start = time.perf_counter()
    code = O.load(setup.official)
    files = setup.data
    sampler, iters, ahead = _loader_sampler(setup, threads, len(files.train_files()[0]))
    loader = O.loader(code, files.train_dir, files.mixing_dir, jsd=jsd,
                      batch_size=setup.batch_size, workers=threads,
                      pin_memory=setup.device == "gpu", sampler=sampler,
                      prefetch_factor=LOADER_PREFETCH, mixing_files=files.mixing_files())
    return _time_loader(setup, start, loader, iters, ahead, threads)


def kernel_alone(setup: Setup, threads: int, *, jsd: bool) -> dict:
    """The fused backend alone on the device (Triton kernels on GPU, eager torch on CPU): random
    images and mixing pictures already on the device, raw uniforms in, views out in float16 on
    GPU (what training takes), float32 on CPU."""
    from dali_ipmix import fused
    from dali_ipmix import tape as T
    start = time.perf_counter()
    cfg = setup.cfg.replace(jsd=jsd)
    dev = setup.torch_device
    S, B = cfg.image_size, setup.batch_size
    gen = torch.Generator().manual_seed(setup.seed)
    x = torch.randint(0, 256, (B, S, S, 3), dtype=torch.uint8, generator=gen).to(dev)
    f = torch.randint(0, 256, (B, S, S, 3), dtype=torch.uint8, generator=gen).to(dev)
    u = torch.rand((B, cfg.n_aug, T.uniform_size(cfg)), generator=gen).to(dev)
    dtype = torch.float16 if setup.device == "gpu" else torch.float32
    impl = fused.default_impl(dev)
    result = timed(setup, start, lambda: (x, f, u),
                   lambda b: fused.ipmix_views_from_uniforms(*b, cfg, dtype, impl=impl))
    return {**result, "impl": impl}


# ---------------------------------------------------------------------------------------------
# Training rows: train (pipeline + step) and synthetic (step alone).

def train_step(setup: Setup, views: int) -> Callable:
    """``step((images [B*views, 3, S, S], labels [B]))``: forward, IPMix loss, backward, SGD, as in
    train.py (model from torchvision, random init)."""
    import torchvision
    from dali_ipmix.losses import ipmix_loss
    from dali_ipmix.training.precision import autocast
    torch.manual_seed(setup.seed)
    model = torchvision.models.get_model(setup.arch, weights=None,
                                         num_classes=setup.data.classes).to(setup.torch_device)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if setup.device == "gpu":
        torch.backends.cudnn.benchmark = True        # as the official code
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                                weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler(setup.torch_device.type, enabled=setup.amp == "fp16")

    def step(batch) -> None:
        images, labels = batch
        with autocast(setup.amp, setup.torch_device.type):
            logits = model(images)
        loss, _ = ipmix_loss(logits, labels, views)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def train_pipeline_step(setup: Setup, threads: int) -> dict:
    """The DALI IPMix pipeline (``setup.backend``, JSD triple) feeding the training step."""
    start = time.perf_counter()
    step = train_step(setup, setup.cfg.views)
    loader = dali_loader(setup, threads, setup.cfg, setup.backend, setup.channels_last)
    batches = endless(loader)
    result = timed(setup, start, lambda: next(batches), step, extra_warmup=DALI_PREFETCH)
    del batches, loader, step
    return result


def synthetic_step(setup: Setup, threads: int) -> dict:
    """The training step alone on one batch of random data made on the device: the most images
    per second any loader can make this model train on."""
    start = time.perf_counter()
    views = setup.cfg.views
    step = train_step(setup, views)
    gen = torch.Generator(setup.torch_device).manual_seed(setup.seed)
    size = setup.cfg.image_size
    images = torch.randn(setup.batch_size * views, 3, size, size, generator=gen,
                         device=setup.torch_device)
    if setup.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, setup.data.classes, (setup.batch_size,), generator=gen,
                           device=setup.torch_device)
    # as many untimed steps as the train row takes (its warm-up also drains DALI's queue)
    result = timed(setup, start, lambda: (images, labels), step, extra_warmup=DALI_PREFETCH)
    del step, images, labels
    return result
