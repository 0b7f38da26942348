"""The fused torch backend against the NumPy/PIL reference, op by op and view by view."""
import numpy as np
import pytest
import torch

from dali_ipmix import config as C, fused, fused_node, reference as R, tape as T
from conftest import MAGNITUDES

CFG = C.IMAGENET.replace(image_size=64, patch_sizes=(4, 8, 16, 32, 64))
OPS = C.ALL_IMAGE_OPS


def _batch(images):
    return torch.from_numpy(np.stack(images))


def _diff(a, b):
    return np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32))


@pytest.mark.parametrize("name", OPS)
def test_image_op_bit_exact_with_pil(name, photos64):
    # One op per sample with its own magnitude, all in one batched call.
    for mag in MAGNITUDES[name]:
        m = C.IDENTITY_MAGNITUDE.get(name, 0.0) if mag is None else mag
        out = fused.image_op(_batch(photos64), torch.full((6,), OPS.index(name)),
                              torch.full((6,), float(m)), OPS).numpy()
        # tapes carry float32 magnitudes: PIL gets the same float32 value as a Python float
        m32 = None if mag is None else float(np.float32(mag))
        ref = np.stack([R.image_op(im, name, m32) for im in photos64])
        assert _diff(out, ref).max() == 0, (name, mag, _diff(out, ref).max())


def test_mixed_ops_in_one_batch(photos64):
    # a different op on every sample: per-sample dispatch must not leak between samples
    names = ["rotate", "equalize", "autocontrast", "sharpness", "posterize", "shear_y"]
    mags = [-8, 0, 7.2, 0.6, 3, 0.05]
    out = fused.image_op(_batch(photos64), torch.tensor([OPS.index(n) for n in names]),
                          torch.tensor(mags, dtype=torch.float32), OPS).numpy()
    for i, (n, m) in enumerate(zip(names, mags)):
        assert _diff(out[i], R.image_op(photos64[i], n, float(np.float32(m)))).max() == 0, n


@pytest.mark.parametrize("overflow", ["wrap", "clamp"])
def test_mixings_match_formula(overflow, photos64, partners64):
    rng = np.random.default_rng(0)
    B = len(photos64)
    for mix_name in C.MIXING_OPS:
        a = rng.uniform(0, 3, B).astype(np.float32)          # a + b far from 1: overflows
        b = rng.uniform(0, 3, B).astype(np.float32)
        p = rng.uniform(0, 1, B).astype(np.float32)
        seed = rng.integers(0, 2 ** 24, B)
        win = np.array([[3, 5, 32, 16], [0, 0, 64, 64], [10, 10, 4, 50], [60, 0, 4, 64],
                        [0, 0, 8, 8], [20, 30, 44, 34]])
        out = fused.mixing_op(_batch(photos64), _batch(partners64),
                            torch.full((B,), C.MIXING_OPS.index(mix_name)), torch.from_numpy(a),
                            torch.from_numpy(b), torch.from_numpy(p),
                            torch.from_numpy(seed.astype(np.float32)), torch.from_numpy(win),
                            overflow).numpy()
        for i in range(B):
            ref = R.mixing_op(photos64[i], partners64[i], mix_name, a[i], b[i], p[i], seed[i],
                              win[i], overflow)
            d = _diff(out[i], ref)
            # multiply: torch.pow and numpy ** may differ by 1 ulp, moving rare pixels one level
            # (or, on a wrapping overflow, across the wrap)
            if mix_name == "multiply":
                assert (d > 0).mean() < 1e-3, (mix_name, i)
            else:
                assert d.max() == 0, (mix_name, i, d.max())
            t, l, h, w = win[i]
            outside = np.ones(ref.shape[:2], bool)
            outside[t:t + h, l:l + w] = False
            np.testing.assert_array_equal(out[i][outside], photos64[i][outside])


def test_wrap_quirk_is_reproduced(photos64, partners64):
    # add with a = b = 1 overflows for bright pairs: wrap gives dark pixels, clamp gives 255
    x1 = np.full((1, 8, 8, 3), 250, np.uint8)
    x2 = np.full((1, 8, 8, 3), 240, np.uint8)
    args = (torch.zeros(1), torch.ones(1), torch.ones(1), torch.zeros(1), torch.zeros(1),
            torch.tensor([[0, 0, 8, 8]]))
    wrap = fused.mixing_op(torch.from_numpy(x1), torch.from_numpy(x2), *args, "wrap").numpy()
    clamp = fused.mixing_op(torch.from_numpy(x1), torch.from_numpy(x2), *args, "clamp").numpy()
    assert (clamp == 255).all()
    expected = R.to_uint8(np.float32(((250 / 255 * 2 - 1) + (240 / 255 * 2 - 1) + 1) / 2)[None])
    assert wrap[0, 0, 0, 0] == expected[0] and expected[0] < 255


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [CFG, CFG.replace(jsd=False, all_ops=True, k=2, t=4),
                                 C.CIFAR.replace(overflow="clamp")], ids=["jsd", "all_ops", "cifar"])
def test_views_match_reference(cfg, photos64, partners64):
    size = cfg.image_size
    xs = [np.asarray(R.Image.fromarray(p).resize((size, size))) for p in photos64]
    fs = [np.asarray(R.Image.fromarray(p).resize((size, size))) for p in partners64]
    A = cfg.n_aug
    tapes = np.stack([T.sample(np.random.default_rng(11 + a), cfg, len(xs)) for a in range(A)], 1)
    out = fused.ipmix_views(_batch(xs), _batch(fs), torch.from_numpy(tapes), cfg).numpy()
    assert out.shape == (len(xs), cfg.views, 3, size, size)
    for i in range(len(xs)):
        ref = R.ipmix_views(xs[i], fs[i], tapes[i], cfg)
        # float32 mix/normalise in another order: ~1e-6; a rare 1-ulp pow difference in multiply
        # can move one pixel (documented in fused.py), so bound the mean tightly and the max loosely
        d = np.abs(out[i] - ref)
        assert d.mean() < 1e-4, (i, d.mean())


def test_views_shape_errors(photos64):
    x = _batch(photos64)
    with pytest.raises(ValueError, match="tapes must be"):
        fused.ipmix_views(x, x, torch.zeros(6, 2, 5), CFG)
    with pytest.raises(ValueError, match="mixing pictures must match"):
        fused.ipmix_views(x, x[:, :32], torch.zeros(6, 2, T.TapeLayout(CFG.k, CFG.t).size), CFG)


def test_dali_node_equals_direct_call(photos64, partners64):
    # the batch-level node: uniforms drawn in the graph, decoded by the backend; default executor
    from nvidia.dali import fn, pipeline_def
    cfg = CFG.replace(k=2, t=2)
    B = 3

    @pipeline_def(batch_size=B, num_threads=2, device_id=None, seed=5)
    def graph():
        x = fn.external_source(lambda: photos64[:B], batch=True, layout="HWC")
        f = fn.external_source(lambda: partners64[:B], batch=True, layout="HWC")
        u = T.dali_uniforms(cfg, cfg.n_aug)
        views, tapes = fused_node.fused_ipmix_node(x, f, u, cfg, device="cpu")
        return views, tapes, u

    pipe = graph()
    pipe.build()
    for _ in range(2):
        views, tapes, u = pipe.run()
        tp = np.stack([np.asarray(tapes.at(i)) for i in range(B)])
        uu = np.stack([np.asarray(u.at(i)) for i in range(B)])
        np.testing.assert_array_equal(tp, T.decode_flat(uu, cfg))       # NumPy's decoder
        direct = fused.ipmix_views(_batch(photos64[:B]), _batch(partners64[:B]),
                                   torch.from_numpy(tp), cfg).numpy()
        got = np.stack([np.asarray(views.at(i)) for i in range(B)])
        np.testing.assert_array_equal(got, direct)
        assert views.layout() == "FCHW" and got.shape == (B, 3, 3, 64, 64)


@pytest.mark.gpu
def test_gpu_kernels_match_reference(photos64, partners64):
    cfg = CFG
    tapes = np.stack([T.sample(np.random.default_rng(21 + a), cfg, 6) for a in range(2)], 1)
    out = fused.ipmix_views(_batch(photos64).cuda(), _batch(partners64).cuda(),
                            torch.from_numpy(tapes).cuda(), cfg, impl="triton").cpu().numpy()
    ref = np.stack([R.ipmix_views(photos64[i], partners64[i], tapes[i], cfg) for i in range(6)])
    # libdevice pow may differ from NumPy's in the last bit: rare multiply pixels move
    assert np.abs(out - ref).mean() < 2e-3


@pytest.mark.gpu
def test_gpu_dali_node_equals_direct_call(photos64, partners64):
    # the node on DALI's stream (no synchronise) gives what a direct call gives, batch after batch
    from nvidia.dali import fn, pipeline_def
    cfg = CFG
    B = 6

    @pipeline_def(batch_size=B, num_threads=2, device_id=0, seed=5)
    def graph():
        x = fn.external_source(lambda: photos64[:B], batch=True, layout="HWC")
        f = fn.external_source(lambda: partners64[:B], batch=True, layout="HWC")
        u = T.dali_uniforms(cfg, cfg.n_aug)
        views, tapes = fused_node.fused_ipmix_node(x, f, u, cfg, device="gpu",
                                              out_dtype=torch.float16)
        return views, tapes, u

    pipe = graph()
    pipe.build()
    for _ in range(4):
        views, tapes, u = pipe.run()
        got = torch.from_dlpack(views.as_tensor()).cpu()
        uu = torch.from_numpy(np.asarray(u.as_tensor())).cuda()            # a CPU output
        direct, direct_tapes = fused.ipmix_views_from_uniforms(
            _batch(photos64[:B]).cuda(), _batch(partners64[:B]).cuda(), uu, cfg, torch.float16,
            impl="triton")
        assert views.layout() == "FCHW" and got.dtype == torch.float16
        torch.testing.assert_close(got, direct.cpu(), atol=0, rtol=0)
        torch.testing.assert_close(torch.from_dlpack(tapes.as_tensor()).cpu(), direct_tapes.cpu(),
                                   atol=0, rtol=0)                       # a GPU output


def test_every_op_dispatches_through_its_record():
    # an op the table has but a backend's family table lacks, or one filed under another family,
    # is refused (never a silent fall-through to another op's code)
    point = set(C.POINT_OPS)
    C.check_implemented(point, "here", "point")
    with pytest.raises(NotImplementedError,
                       match="image op 'invert' \\(point\\) has no implementation in here"):
        C.check_implemented(point - {"invert"}, "here", "point")
    with pytest.raises(NotImplementedError,
                       match="here has point code for 'rotate', and config.OP_TABLE says it "
                             "is a geometric op"):
        C.check_implemented(point | {"rotate"}, "here", "point")
    with pytest.raises(ValueError, match="unknown image op 'nope'"):
        fused.image_op(_batch([np.zeros((8, 8, 3), np.uint8)]), torch.zeros(1), torch.zeros(1),
                       ("invert", "nope"))


def test_torch_ops_follow_the_given_op_list(photos64):
    # op indices index the op list they were drawn with (cfg.ops), not the table's order
    ops = ("sharpness", "invert", "rotate", "autocontrast", "solarize", "mirror")
    mags = [0.6, 0, -8, 7.2, 128, 0]
    out = fused.image_op(_batch(photos64), torch.arange(6), torch.tensor(mags), ops).numpy()
    for i, (n, m) in enumerate(zip(ops, mags)):
        assert _diff(out[i], R.image_op(photos64[i], n, float(np.float32(m)))).max() == 0, n


def test_dali_node_refuses_an_untested_dali():
    for version in ("2.4.0", "2.4.1", "2.4.0.dev20260101"):
        fused_node.check_dali_version(version)
    from dali_ipmix.errors import UserError
    for version in ("2.5.0", "1.30.0", "3.4.0", "unknown"):
        with pytest.raises(UserError, match=r"tested with DALI 2\.4\.x only, and this is DALI "
                                            + version.replace(".", r"\.")
                                            + r": install 'nvidia-dali-cuda120==2\.4\.\*'"):
            fused_node.check_dali_version(version)
