"""Long runs: host memory (RSS) of the CPU training pipeline stays flat after warm-up.

The bound is derived from what a leak would cost: retaining one output batch per step (the most
common leak: a reference kept to each step's views) adds BATCH_BYTES per step, so over STEPS steps
it grows RSS by STEPS * BATCH_BYTES (about 37 MB here).  The bound is half of that; the observed
growth after warm-up is 0-2 MB on the 2-core CPU machine (allocator and DALI pool noise).  A second
phase retains batches on purpose and checks that the probe sees them, so the test cannot pass
because RSS is mismeasured.
"""
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import photo_crops
from dali_ipmix import config as C
from dali_ipmix.loader import DaliLoader
from pipelines import imagenet

CFG = C.IMAGENET.replace(image_size=32, patch_sizes=(4, 8, 16, 32))
BATCH = 4
FILES = 16            # 4 batches per epoch: the loop also crosses ~60 epoch ends (iterator reset)
WARMUP = 50           # DALI and torch allocate their buffers and pools in the first steps
STEPS = 250
RETAINED = 60
BATCH_BYTES = BATCH * CFG.views * 3 * CFG.image_size ** 2 * 4   # float32 views of one step


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    for i, photo in enumerate(photo_crops(48, FILES, seed=11)):
        (root / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo).save(root / "train" / f"c{i % 2}" / f"{i}.jpg", quality=90)
    (root / "mix").mkdir()
    for i, photo in enumerate(photo_crops(48, 4, seed=12)):
        Image.fromarray(photo).save(root / "mix" / f"{i}.jpg", quality=90)
    return root


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_rss_flat_over_hundreds_of_steps(tiny_set):
    # A fresh process: in a long pytest session freed pages of earlier tests would absorb a leak
    # (and the probe below) without any RSS change.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "tests")]))
    code = f"import test_memory, pathlib; test_memory.measure(pathlib.Path({str(tiny_set)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def measure(tiny_set):
    pipe = imagenet.train_pipeline(tiny_set / "train", tiny_set / "mix", cfg=CFG, batch_size=BATCH,
                                   num_threads=2, device="cpu", backend="fused", resize=36)
    loader = DaliLoader(pipe)

    def steps():
        while True:                 # epoch after epoch, as a long training run does
            yield from loader

    batches = steps()
    for _ in range(WARMUP):
        views, labels = next(batches)
    assert views.numel() * views.element_size() == BATCH_BYTES
    start = rss_bytes()
    for _ in range(STEPS):
        views, labels = next(batches)
    growth = rss_bytes() - start
    bound = STEPS * BATCH_BYTES // 2
    assert growth < bound, f"RSS grew {growth / 2**20:.1f} MiB over {STEPS} steps (bound {bound / 2**20:.1f} MiB)"

    # the probe sees a real leak of that kind: retained batches show up in RSS
    kept, before = [], rss_bytes()
    for _ in range(RETAINED):
        kept.append(next(batches)[0].clone())
    assert rss_bytes() - before > 0.8 * RETAINED * BATCH_BYTES
