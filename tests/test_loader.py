"""A batch's memory (dali_ipmix.loader, docs/architecture.md "A batch's memory"): the consumer gets
memory of its own, and DALI's memory is released only after the copy out of it has completed.

On the CPU: ``StreamHandoff`` with a stand-in CUDA event, and ``DaliLoader`` running its GPU path
(``handoff=``) on a CPU pipeline.  On a GPU: the hazard itself -- per batch, a checksum, the
consumer's stream kept busy while the host moves on, the checksum again (``gpu``).
"""
import weakref

import pytest
import torch

from dali_ipmix import config as C
from dali_ipmix import loader as L
from dali_ipmix.loader import DaliLoader
from pipelines import imagenet

CFG = C.IMAGENET.replace(image_size=32, patch_sizes=(4, 8, 16, 32))


class FakeEvent:
    """A CUDA event stand-in: completes when the test says so (or when the host waits for it)."""
    made = []

    def __init__(self):
        self.done = self.recorded = False
        self.waited = 0
        FakeEvent.made.append(self)

    def record(self):
        self.recorded = True

    def query(self):
        return self.done

    def synchronize(self):
        self.waited += 1
        self.done = True


@pytest.fixture(autouse=True)
def _fresh_events():
    FakeEvent.made = []


def _copy(*ts):
    return tuple(t.clone() for t in ts)


def test_sources_live_until_their_copy_has_completed():
    handoff = L.StreamHandoff(max_pending=4, event=FakeEvent)
    src = torch.arange(12.0)
    alive = weakref.ref(src)
    (out,) = handoff((src,), _copy)
    del src
    assert alive() is not None and FakeEvent.made[0].recorded     # the copy may still read it
    assert out.data_ptr() != alive().data_ptr() and torch.equal(out, torch.arange(12.0))
    handoff.release()
    assert alive() is not None                                    # event not done yet
    FakeEvent.made[0].done = True
    handoff.release()
    assert alive() is None and not handoff.pending                # released, without waiting
    assert FakeEvent.made[0].waited <= 1


def test_pending_copies_are_bounded_by_waiting_for_the_oldest():
    handoff = L.StreamHandoff(max_pending=2, event=FakeEvent)
    for i in range(5):
        handoff((torch.full((3,), float(i)),), _copy)
        assert len(handoff.pending) <= 2
    # a consumer stream that never catches up: the host waited for the three oldest, in order
    assert [e.waited for e in FakeEvent.made] == [1, 1, 1, 0, 0]
    handoff.wait_all()
    assert not handoff.pending and all(e.done for e in FakeEvent.made)


def test_a_convert_that_does_not_copy_is_refused():
    handoff = L.StreamHandoff(event=FakeEvent)
    with pytest.raises(RuntimeError, match="must copy"):
        handoff((torch.zeros(4, 4),), lambda t: (t.view(16),))
    with pytest.raises(ValueError, match="max_pending"):
        L.StreamHandoff(max_pending=0)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from conftest import make_class_folders
    return make_class_folders(tmp_path_factory.mktemp("loader"), n_images=8, n_classes=2,
                              n_pictures=3)


def _loader(tiny_set, **kw):
    import os
    pipe = imagenet.train_pipeline(os.path.join(tiny_set, "train"), os.path.join(tiny_set, "mixing"),
                                   cfg=CFG, batch_size=4, num_threads=1, device="cpu",
                                   backend="fused", resize=36, seed=3)
    return DaliLoader(pipe, **kw)


@pytest.mark.parametrize("views_layout", ["sample_major", "view_major"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_loader_hands_out_copies_and_holds_dali_memory_until_copied(tiny_set, channels_last,
                                                                    views_layout):
    # the GPU path's one copy also flattens the views in the wanted order: the same batch as the
    # CPU path's flatten
    plain = _loader(tiny_set, channels_last=channels_last, views_layout=views_layout)
    handoff = L.StreamHandoff(max_pending=3, event=FakeEvent)
    owned = _loader(tiny_set, channels_last=channels_last, views_layout=views_layout,
                    handoff=handoff)
    for step, ((want, want_labels), (images, labels)) in enumerate(zip(plain, owned)):
        # the same batch, in the same layout, as the zero-copy path gives
        assert torch.equal(images, want) and torch.equal(labels, want_labels)
        assert images.shape == (4 * CFG.views, 3, 32, 32) and labels.dtype == torch.long
        assert images.is_contiguous(memory_format=torch.channels_last if channels_last
                                    else torch.contiguous_format)
        # ... but in memory of its own; DALI's tensors wait in the handoff until the copy is done
        sources = handoff.pending[-1][1]
        assert images.data_ptr() != sources[0].data_ptr()
        assert torch.equal(sources[0].reshape(images.shape), images)
        assert len(handoff.pending) == min(step + 1, 3)
        if step == 4:
            break
    for e in FakeEvent.made:                          # the copies complete
        e.done = True
    handoff.release()
    assert not handoff.pending


# ---------------------------------------------------------------------------------------------
# The hazard itself, on a GPU.

SLEEP_CYCLES = 50_000_000          # ~25-35 ms of a busy consumer stream per batch
BATCHES = 48


def _gpu_loader(data_dir, channels_last):
    import os
    pipe = imagenet.train_pipeline(os.path.join(data_dir, "train"), os.path.join(data_dir, "mixing"),
                                   cfg=C.IMAGENET.replace(image_size=64, patch_sizes=(4, 8, 16, 32, 64)),
                                   batch_size=16, num_threads=2, device="gpu", backend="fused",
                                   resize=73, seed=1, dtype="float16", prefetch_queue_depth=2,
                                   hw_decoder_load=0.0)     # one decoder: replays give equal pixels
    return DaliLoader(pipe, last_batch="fill", device=torch.device("cuda"),
                      channels_last=channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_batch_is_not_overwritten_while_the_consumer_stream_still_reads_it(tiny_gpu_set,
                                                                            channels_last):
    # Per batch: a checksum (the host waits), then the consumer's stream is kept busy
    # (torch.cuda._sleep) while the host drops the batch and moves on to the next ones -- DALI
    # keeps producing on its own stream meanwhile -- then the same checksum again, queued behind
    # the sleep.  If the memory of a dropped batch went back to DALI's pool with those reads
    # still queued, a later batch overwrites it first and the two checksums differ.
    batches = _endless(_gpu_loader(tiny_gpu_set, channels_last))
    before, after = [], []
    for _ in range(BATCHES):
        images, labels = next(batches)
        before.append(_checksum(images, labels).cpu())          # the host waits for this one
        torch.cuda._sleep(SLEEP_CYCLES)
        after.append(_checksum(images, labels))                 # queued behind the sleep
        del images, labels
    torch.cuda.synchronize()
    changed = [i for i, (b, a) in enumerate(zip(before, after)) if not torch.equal(b, a.cpu())]
    assert not changed, f"{len(changed)} of {BATCHES} batches changed while still being read: {changed}"


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_batch_fetched_while_the_consumer_stream_is_busy_is_the_batch_made(tiny_gpu_set,
                                                                            channels_last):
    # The other order: the consumer's stream is busy BEFORE each batch arrives (as in training,
    # where the previous step is still running), so whatever the loader enqueues -- its copy,
    # the channels_last conversion -- and the checksum run late while the host races ahead.
    # Against a replay of the same seeded pipeline read synchronously (nothing can race there).
    racing = _endless(_gpu_loader(tiny_gpu_set, channels_last))
    got = []
    for _ in range(BATCHES):
        torch.cuda._sleep(SLEEP_CYCLES)
        images, labels = next(racing)
        got.append(_checksum(images, labels))
        del images, labels
    torch.cuda.synchronize()
    calm = _endless(_gpu_loader(tiny_gpu_set, channels_last))
    want = []
    for _ in range(BATCHES):
        images, labels = next(calm)
        want.append(_checksum(images, labels).cpu())
        torch.cuda.synchronize()
        del images, labels
    changed = [i for i, (g, w) in enumerate(zip(got, want)) if not torch.equal(g.cpu(), w)]
    assert not changed, f"{len(changed)} of {BATCHES} batches differ from the calm replay: {changed}"


def _checksum(images, labels):
    flat = images.reshape(-1).double()
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64) % 1009
    return torch.stack([flat.sum(), (flat * weights).sum(), labels.double().sum()])


def _endless(loader):
    while True:
        yield from loader


@pytest.fixture(scope="module")
def tiny_gpu_set(tmp_path_factory):
    from conftest import make_class_folders
    return make_class_folders(tmp_path_factory.mktemp("lifetime"), n_images=48, n_classes=3,
                              n_pictures=8)
