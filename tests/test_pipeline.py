"""The complete training and validation graphs on generated JPEGs, CPU backend."""
import numpy as np
import pytest

from dali_ipmix import config as C, reference as R
from dali_ipmix.errors import UserError
from pipelines import imagenet

CFG = C.IMAGENET.replace(k=2, t=2, image_size=64, patch_sizes=(4, 8, 16, 32, 64))
BATCH = 4


def _run(pipe, iters=1):
    pipe.build()
    outs = [pipe.run() for _ in range(iters)]
    return [[[np.asarray(t.at(i)) for i in range(BATCH)] for t in out] for out in outs]


def _train(dataset, backend="dali", seed=0, **kw):
    return imagenet.train_pipeline(dataset / "train", dataset / "mixing", cfg=CFG, batch_size=BATCH,
                                   num_threads=2, device="cpu", backend=backend, seed=seed, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "fused"])
def test_train_graph_replays_through_reference(dataset, backend):
    pipe = _train(dataset, backend=backend, extra_outputs=True)
    pipe.build()
    views, labels, crops, pics, tapes = pipe.run()
    for i in range(BATCH):
        v = np.asarray(views.at(i))
        assert v.shape == (3, 3, 64, 64) and v.dtype == np.float32
        crop, pic, tp = np.asarray(crops.at(i)), np.asarray(pics.at(i)), np.asarray(tapes.at(i))
        assert crop.shape == (64, 64, 3) and pic.shape == (64, 64, 3) and tp.shape[0] == 2
        ref = R.ipmix_views(crop, pic, tp, CFG)
        np.testing.assert_allclose(v[0], ref[0], atol=1e-5)          # clean view: exact
        # readable backend: equal up to the documented op tolerances (equalize, bilinear
        # rounding); fused backend: PIL-exact ops, float32 mixing in another order
        assert np.abs(v - ref).mean() < (0.02 if backend == "dali" else 1e-4)


@pytest.mark.gpu
def test_gpu_train_graph_replays_through_reference(dataset):
    # mixed decoding, the fused kernels on the GPU, float16 out: the reference replays every sample
    pipe = imagenet.train_pipeline(dataset / "train", dataset / "mixing", cfg=CFG,
                                   batch_size=BATCH, num_threads=2, device="gpu", backend="fused",
                                   extra_outputs=True, dtype="float16")
    pipe.build()
    for _ in range(2):
        views, labels, crops, pics, tapes = (o.as_cpu() for o in pipe.run())
        for i in range(BATCH):
            v = np.asarray(views.at(i)).astype(np.float32)
            assert v.shape == (3, 3, 64, 64)
            ref = R.ipmix_views(np.asarray(crops.at(i)), np.asarray(pics.at(i)),
                                np.asarray(tapes.at(i)), CFG)
            assert np.abs(v - ref).mean() < 5e-3          # float16 rounding + rare pow ulps


@pytest.mark.slow
def test_labels_untouched(dataset):
    # one epoch (12 files, batch 4) carries each file's class label once, the same as without IPMix
    ipmix = _run(_train(dataset, seed=7), iters=3)
    plain = _run(_train(dataset, backend="none", seed=7), iters=3)
    got = [int(l[0]) for it in ipmix for l in it[1]]
    assert sorted(got) == [0] * 4 + [1] * 4 + [2] * 4
    assert got == [int(l[0]) for it in plain for l in it[1]]


def test_same_seed_same_output_other_seed_differs(dataset):
    a = _run(_train(dataset, backend="fused", seed=3), iters=2)
    b = _run(_train(dataset, backend="fused", seed=3), iters=2)
    c = _run(_train(dataset, backend="fused", seed=4), iters=2)
    for x, y in zip(a, b):
        for tx, ty in zip(x, y):
            np.testing.assert_array_equal(np.stack(tx), np.stack(ty))
    assert not np.array_equal(np.stack(a[1][0]), np.stack(c[1][0]))


@pytest.mark.slow
def test_no_jsd_one_view_and_shards(dataset):
    cfg = CFG.replace(jsd=False)
    pipe = imagenet.train_pipeline(dataset / "train", dataset / "mixing", cfg=cfg, batch_size=BATCH,
                                   num_threads=2, device="cpu", backend="dali", shard_id=1,
                                   num_shards=2)
    pipe.build()
    views, labels = pipe.run()
    assert np.asarray(views.at(0)).shape == (1, 3, 64, 64)
    meta = pipe.reader_meta("Reader")
    assert meta["number_of_shards"] == 2 and meta["shard_id"] == 1


def test_plain_backend_and_val_graph(dataset):
    (views, labels), = _run(_train(dataset, backend="none"))
    assert views[0].shape == (3, 3, 64, 64)
    np.testing.assert_array_equal(views[0][0], views[0][1])          # no augmentation
    val = imagenet.val_pipeline(dataset / "val", cfg=CFG, batch_size=BATCH, num_threads=2,
                                device="cpu", resize=72)
    (imgs, labels), = _run(val)
    assert imgs[0].shape == (3, 64, 64)
    assert val.reader_meta("Reader")["epoch_size"] == 12


def test_bad_folders_give_one_line_errors(dataset, tmp_path):
    cases = [
        (tmp_path / "missing", dataset / "mixing", "--data .*missing: no such folder"),
        (tmp_path / "empty", dataset / "mixing", "no class sub-folders"),
        (dataset / "train", tmp_path / "nomix", "--mixing .*nomix: no such folder"),
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "emptymix").mkdir()
    (tmp_path / "emptymix" / "notes.txt").write_text("no pictures here")
    cases.append((dataset / "train", tmp_path / "emptymix", "--mixing .*emptymix: no pictures"))
    for data, mixing, msg in cases:
        with pytest.raises(UserError, match=msg) as e:
            imagenet.train_pipeline(data, mixing, cfg=CFG, device="cpu", backend="dali")
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="--backend 'magic'"):
        _train(dataset, backend="magic")


@pytest.mark.parametrize("knob,value,msg", [("k", 0, "k must be"), ("t", 9, "t must be"),
                                             ("patch_sizes", (300,), "patch_sizes"),
                                             ("overflow", "saturate", "overflow")])
def test_config_out_of_range(knob, value, msg):
    with pytest.raises(ValueError, match=msg):
        CFG.replace(**{knob: value})


def test_cifar_graph_32px_padded_crop_replays_through_reference(dataset):
    from pipelines import cifar
    cfg = C.CIFAR.replace(k=2, t=2)
    pipe = cifar.train_pipeline(dataset / "train", dataset / "mixing", cfg=cfg, batch_size=BATCH,
                                num_threads=2, device="cpu", backend="fused", seed=2,
                                extra_outputs=True)
    pipe.build()
    views, labels, crops, pics, tapes = pipe.run()
    for i in range(BATCH):
        crop, pic = np.asarray(crops.at(i)), np.asarray(pics.at(i))
        assert crop.shape == pic.shape == (32, 32, 3)
        v = np.asarray(views.at(i))
        assert v.shape == (3, 3, 32, 32)
        ref = R.ipmix_views(crop, pic, np.asarray(tapes.at(i)), cfg)
        assert np.abs(v - ref).mean() < 1e-4


# ---------------------------------------------------------------------------------------------
# Fidelity to the official code

def crop_offsets(n_batches=6, batch=500, seed=0):
    """(dy, dx) of every window ``pipelines.cifar._padded_random_crop`` cut from a 32 px picture
    whose pixels hold their own coordinates (+1; 0 = the zero padding)."""
    from nvidia.dali import fn, pipeline_def
    from pipelines import cifar
    yy, xx = np.mgrid[:32, :32]
    coords = np.stack([yy + 1, xx + 1, np.full_like(yy, 255)], -1).astype(np.uint8)

    @pipeline_def
    def graph():
        images = fn.external_source(source=lambda: [coords] * batch, layout="HWC")
        return cifar._padded_random_crop(images, 32)

    pipe = graph(batch_size=batch, num_threads=1, device_id=None, seed=seed)
    pipe.build()
    offsets = []
    for _ in range(n_batches):
        (out,) = pipe.run()
        for i in range(batch):
            crop = np.asarray(out.at(i))
            y, x = map(int, np.argwhere(crop[..., 2] == 255)[0])      # any pixel of the picture
            offsets.append((int(crop[y, x, 0]) - 1 - y, int(crop[y, x, 1]) - 1 - x))
    return np.array(offsets)


def test_cifar_random_crop_offsets_are_uniform_over_minus4_to_4():
    # official cifar.py: transforms.RandomCrop(32, padding=4), i.e. torch.randint(0, 9) - 4 per axis
    offsets = crop_offsets().ravel()
    values, counts = np.unique(offsets, return_counts=True)
    assert values.tolist() == list(range(-4, 5))
    share = counts / offsets.size
    assert np.all(np.abs(share - 1 / 9) < 0.02), dict(zip(values.tolist(), share.round(3).tolist()))


def _index_pictures(folder, count):
    """``count`` one-pixel pictures whose colour is their index (R + 256 G)."""
    from PIL import Image
    folder.mkdir()
    for i in range(count):
        Image.fromarray(np.array([[[i % 256, i // 256, 0]]], np.uint8)).save(folder / f"{i:05d}.png")


@pytest.mark.slow
def test_ranks_draw_their_own_stream_of_mixing_pictures(dataset, tmp_path):
    # more pictures than DALI's 1024-file shuffle buffer, where equal file lists walk in step
    count, draws = 3000, 400
    _index_pictures(tmp_path / "mixing", count)
    cfg = C.IMAGENET.replace(k=1, t=1, image_size=32, patch_sizes=(32,))
    seen = []
    for rank in range(2):
        pipe = imagenet.train_pipeline(dataset / "train", tmp_path / "mixing", cfg=cfg, batch_size=50,
                                       num_threads=1, device="cpu", backend="none", seed=0,
                                       shard_id=rank, num_shards=2, resize=36, extra_outputs=True)
        pipe.build()
        picks = []
        while len(picks) < draws:
            pics = pipe.run()[3]
            picks += [int(p[0, 0, 0]) + 256 * int(p[0, 0, 1]) for p in map(np.asarray, pics)]
        seen.append(set(picks[:draws]))
    assert all(len(s) == draws for s in seen)           # each rank: distinct pictures
    # independent streams share about draws^2 / count = 53 pictures; readers walking one list in
    # step share about 125 (the same ~1024-picture window)
    assert len(seen[0] & seen[1]) < 90


def test_val_shard_is_the_same_in_every_pass(dataset):
    # a rank's clean and robust evaluations are two passes over its validation loader: both must
    # see its shard (DALI's reader moves to the next shard after each epoch unless told not to)
    from dali_ipmix.loader import DaliLoader
    import torch
    loader = DaliLoader(imagenet.val_pipeline(dataset / "val", cfg=CFG, batch_size=BATCH, num_threads=1,
                                              device="cpu", shard_id=0, num_shards=2),
                        last_batch="partial", device=torch.device("cpu"))
    passes = [torch.cat([images.flatten(1).sum(1) for images, _ in loader]) for _ in range(2)]
    assert len(passes[0]) == 6 and torch.equal(passes[0], passes[1])
