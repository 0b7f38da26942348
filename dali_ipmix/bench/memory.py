"""Peak host and device memory while one contender runs, sampled by a background thread.

Host: resident set size (RSS) of this process plus the child processes started during the
measurement (DataLoader workers); children that already existed (e.g. a multiprocessing
forkserver) are not counted.  RSS of forked workers counts pages they share with the parent
once per process, so the sum overstates what they cost together -- it is what ``top`` shows.
``resource.getrusage`` cannot do this: its peak covers the whole process lifetime, not one
contender.
Device (CUDA only): ``torch.cuda.max_memory_allocated`` (PyTorch's allocator: the model, the
fused kernel) and the peak of ``total - free`` on the device (every allocator, DALI's pools
included, and anything else on the GPU).
"""
from __future__ import annotations

import threading
from typing import Optional

import psutil

MB = 1024 * 1024
SAMPLE_SECONDS = 0.02


class PeakMemory:
    """``with PeakMemory(cuda) as m: ...`` then ``m.result()`` -> dict of peaks in MiB."""

    def __init__(self, cuda: bool = False, interval: float = SAMPLE_SECONDS):
        self.cuda, self.interval = cuda, interval
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._old_children = set()
        self.host_start = self.host_peak = 0
        self.device_used_peak = 0

    def _host_rss(self) -> int:
        total = self._proc.memory_info().rss
        for child in self._proc.children(recursive=True):
            if child.pid in self._old_children:
                continue
            try:
                total += child.memory_info().rss
            except psutil.Error:        # exited between listing and reading
                pass
        return total

    def _device_used(self) -> int:
        import torch
        free, total = torch.cuda.mem_get_info()
        return total - free

    def sample(self) -> None:
        self.host_peak = max(self.host_peak, self._host_rss())
        if self.cuda:
            self.device_used_peak = max(self.device_used_peak, self._device_used())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "PeakMemory":
        self._old_children = {c.pid for c in self._proc.children(recursive=True)}
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.host_start = self._host_rss()
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="bench-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sample()           # workers are still alive here: the caller stops them afterwards
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        out = {"host_rss_start_mb": round(self.host_start / MB, 1),
               "host_rss_peak_mb": round(self.host_peak / MB, 1),
               "device_torch_peak_mb": None, "device_used_peak_mb": None}
        if self.cuda:
            import torch
            out["device_torch_peak_mb"] = round(torch.cuda.max_memory_allocated() / MB, 1)
            out["device_used_peak_mb"] = round(self.device_used_peak / MB, 1)
        return out
