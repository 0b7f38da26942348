"""Shared fixtures: real photographs (scikit-image ships a few in its wheel), cut into square
crops like the ones IPMix works on, a probe for GPU tests, and two gloo ranks on this machine."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

# Without a CUDA GPU, Triton's kernels run through its interpreter (it must be chosen before
# Triton's decorators run, i.e. before dali_ipmix.triton_kernels is imported).
if "TRITON_INTERPRET" not in os.environ:
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# `make test` runs one pytest-xdist worker per core: each worker's torch gets its share of the
# cores, and so do the processes a test starts (OMP_NUM_THREADS).  torch's default is every
# core per process, and its OpenMP threads spin waiting for one another when the workers'
# threads outnumber the cores.  A test that sets a thread count of its own still does.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    import torch
    _SHARE = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_SHARE))
    torch.set_num_threads(_SHARE)

# magnitudes as the official code hands them to PIL, signs included
MAGNITUDES = {
    "equalize": [None], "mirror": [None], "invert": [None],
    "posterize": [4, 3, 1], "rotate": [2, -8, 5], "solarize": [231, 180, 254],
    "shear_x": [0.03, -0.09], "shear_y": [0.05, -0.02], "translate_x": [7, -3],
    "translate_y": [-7, 2], "autocontrast": [9.5, 7.2], "color": [0.2, 0.6],
    "contrast": [0.118, 0.6], "brightness": [0.2, 0.6], "sharpness": [0.2, 0.6],
}
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg")


def _photo_dir():
    import skimage
    return os.path.join(os.path.dirname(skimage.__file__), "data")


def photo_crops(size: int, n: int, seed: int = 0):
    """``n`` square RGB uint8 crops of real photographs resized to ``size`` (varied scale)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = Image.open(os.path.join(_photo_dir(), PHOTOS[i % len(PHOTOS)])).convert("RGB")
        w, h = im.size
        side = int(min(w, h) * rng.uniform(0.4, 1.0))
        x0, y0 = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        crop = im.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR)
        out.append(np.asarray(crop))
    return out


@pytest.fixture(scope="session")
def photos64():
    return photo_crops(64, 6, seed=1)


@pytest.fixture(scope="session")
def partners64():
    return photo_crops(64, 6, seed=2)[::-1]


def make_class_folders(root, n_images=12, n_classes=3, n_pictures=5, seed=5):
    """A tiny ImageNet-like set of real photographs as JPEGs of varied size: ``root/train/<class>``,
    ``root/val/<class>`` (the same pictures) and a nested mixing folder ``root/mixing``."""
    rng = np.random.default_rng(0)
    for i, crop in enumerate(photo_crops(120, n_images, seed=seed)):
        cls = f"class{i % n_classes}"
        w, h = int(rng.integers(80, 121)), int(rng.integers(80, 121))
        for split in ("train", "val"):
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            Image.fromarray(crop).resize((w, h)).save(
                os.path.join(root, split, cls, f"{i:03d}.jpg"), quality=90)
    for i, pic in enumerate(photo_crops(90, n_pictures, seed=9)):
        sub = os.path.join(root, "mixing", "a" if i % 2 else os.path.join("b", "c"))  # nested is fine
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(pic).save(os.path.join(sub, f"f{i}.jpg"), quality=90)
    return root


class FullDisk:
    """Stands in for a module's ``os`` (monkeypatch ``module.os``): while ``full`` is set the disk
    has ``room`` bytes left, so a write stores what fits and the next one fails with ENOSPC, as on
    a real full disk.  Files opened with ``os.fdopen`` and ``os.write`` go through it; everything
    else is the real ``os``."""

    def __init__(self):
        self.full, self.room = False, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def fill(self, full):
        self.full, self.room = full, 100

    def _take(self, data):
        if not self.full:
            return data
        if self.room <= 0:
            raise OSError(28, "No space left on device")
        part, self.room = bytes(data[:self.room]), self.room - len(data[:self.room])
        return part

    def write(self, fd, data):
        return os.write(fd, self._take(data))

    def fdopen(self, fd, *a, **kw):
        disk, real = self, os.fdopen(fd, *a, **kw)

        class File:
            def write(self, data):      # a buffered file: stores what fits, then raises
                part = disk._take(data)
                real.write(part)
                if len(part) < len(data):
                    raise OSError(28, "No space left on device")
                return len(part)

            def __getattr__(self, name):
                return getattr(real, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                real.close()
        return File()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """12 training / 12 validation JPEGs in 3 classes and 5 mixing pictures."""
    return make_class_folders(tmp_path_factory.mktemp("data"))


def has_gpu() -> bool:
    try:
        from nvidia.dali.backend import GetCUDADeviceCount
        return GetCUDADeviceCount() > 0
    except ImportError:          # no DALI (the GPU machine before it is unpacked): the kernels
        import torch             # alone can still be tested
        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if "PYTEST_XDIST_WORKER" in os.environ:
        # `make test` hands each worker whole files in collection order: the files with the most
        # `slow` cases go first, so that a long file is not started last on one worker while the
        # other has nothing left (every worker sorts the same way; a file keeps its own order)
        slow = {}
        for item in items:
            slow[item.path] = slow.get(item.path, 0) + ("slow" in item.keywords)
        items.sort(key=lambda item: -slow[item.path])
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def shorten_autoattack(monkeypatch, steps: int, queries: int):
    """``attacks.autoattack_standard`` builds the same four attacks with fewer iterations (the
    three gradient attacks ``steps``, Square ``queries``): a CPU-time budget for tests."""
    from dali_ipmix import attacks
    standard = attacks.autoattack_standard

    def shortened(*a, **kw):
        attack = standard(*a, **kw)
        for sub in attack.attacks[:3]:
            sub.steps = steps
        attack.attacks[3].n_queries = queries
        return attack
    monkeypatch.setattr(attacks, "autoattack_standard", shortened)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(script, *argv, timeout=120):
    """Runs ``script`` as rank 0 and 1 of a gloo group on this machine; (return codes, outputs)."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
        procs.append(subprocess.Popen([sys.executable, "-c", script, *argv], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], outs
