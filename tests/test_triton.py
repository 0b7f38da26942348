"""The Triton kernels (``impl="triton"``) against the NumPy/PIL reference, bit for bit.

Without a GPU they run through Triton's interpreter (conftest sets TRITON_INTERPRET=1); on a GPU
machine the ``cuda`` cases run the compiled kernels.
"""
import numpy as np
import pytest
import torch

from dali_ipmix import config as C, fused, reference as R, tape as T
from conftest import MAGNITUDES, photo_crops

OPS = C.ALL_IMAGE_OPS
IMAGENET64 = C.IMAGENET.replace(image_size=64, patch_sizes=(4, 8, 16, 32, 64))


def _interpreting():
    from dali_ipmix import triton_kernels
    return triton_kernels.INTERPRETED


cpu = pytest.mark.skipif("not __import__('test_triton')._interpreting()",
                         reason="TRITON_INTERPRET=1 is not set (a GPU machine: see the cuda tests)")


def _batch(images):
    return torch.from_numpy(np.stack(images))


def _diff(a, b):
    return np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32))


@pytest.mark.slow
@cpu
@pytest.mark.parametrize("name", OPS)
def test_image_op_bit_exact_with_pil(name, photos64):
    for mag in MAGNITUDES[name]:
        m = C.IDENTITY_MAGNITUDE.get(name, 0.0) if mag is None else mag
        out = fused.image_op(_batch(photos64), torch.full((6,), OPS.index(name)),
                              torch.full((6,), float(m)), OPS, impl="triton").numpy()
        m32 = None if mag is None else float(np.float32(mag))
        ref = np.stack([R.image_op(im, name, m32) for im in photos64])
        assert _diff(out, ref).max() == 0, (name, mag, _diff(out, ref).max())


@cpu
def test_mixed_ops_and_unknown_index_in_one_batch(photos64):
    # a different op on every sample (the short op table's indices), one index past its end
    names = ["rotate", "equalize", "posterize", "shear_y", "invert", None]
    mags = [-8, 0, 3, 0.05, 0, 1]
    ops = C.IMAGE_OPS
    index = [ops.index(n) if n else len(ops) for n in names]
    out = fused.image_op(_batch(photos64), torch.tensor(index),
                          torch.tensor(mags, dtype=torch.float32), ops, impl="triton").numpy()
    for i, (n, m) in enumerate(zip(names, mags)):
        ref = photos64[i] if n is None else R.image_op(photos64[i], n, float(np.float32(m)))
        assert _diff(out[i], ref).max() == 0, n


@cpu
def test_ops_follow_the_given_op_list(photos64):
    # op indices index the op list they were drawn with (cfg.ops), whatever the table's order:
    # the kernels map them onto the table (not a prefix of it here)
    ops = ("sharpness", "invert", "rotate", "autocontrast", "solarize", "mirror")
    mags = [0.6, 0, -8, 7.2, 128, 0]
    out = fused.image_op(_batch(photos64), torch.arange(6), torch.tensor(mags), ops,
                         impl="triton").numpy()
    for i, (n, m) in enumerate(zip(ops, mags)):
        assert _diff(out[i], R.image_op(photos64[i], n, float(np.float32(m)))).max() == 0, n


@cpu
def test_fractional_rotation_is_refused(photos64):
    with pytest.raises(ValueError, match="whole degrees"):
        fused.image_op(_batch(photos64), torch.full((6,), OPS.index("rotate")),
                        torch.full((6,), 2.5), OPS, impl="triton")


@pytest.mark.slow
@cpu
@pytest.mark.parametrize("overflow", ["wrap", "clamp"])
def test_mixings_bit_exact(overflow, photos64, partners64):
    rng = np.random.default_rng(0)
    B = len(photos64)
    win = np.array([[3, 5, 32, 16], [0, 0, 64, 64], [10, 10, 4, 50], [60, 0, 4, 64],
                    [0, 0, 8, 8], [20, 30, 44, 34]])
    for name in C.MIXING_OPS:
        a = rng.uniform(-1, 3, B).astype(np.float32)          # a + b far from 1: overflows
        b = rng.uniform(-1, 3, B).astype(np.float32)
        p = rng.uniform(0, 1, B).astype(np.float32)
        seed = rng.integers(0, 2 ** 24, B)
        out = fused.mixing_op(_batch(photos64), _batch(partners64),
                            torch.full((B,), C.MIXING_OPS.index(name)), torch.from_numpy(a),
                            torch.from_numpy(b), torch.from_numpy(p),
                            torch.from_numpy(seed.astype(np.float32)), torch.from_numpy(win),
                            overflow, impl="triton").numpy()
        for i in range(B):
            ref = R.mixing_op(photos64[i], partners64[i], name, a[i], b[i], p[i], seed[i],
                              win[i], overflow)
            assert _diff(out[i], ref).max() == 0, (name, i)


DECODE_CFGS = {
    "imagenet": C.IMAGENET, "cifar": C.CIFAR, "all_ops": C.IMAGENET.replace(all_ops=True),
    "k8_t1_paper": C.IMAGENET.replace(k=8, t=1, depth_min=1, square_prob=0.3, beta=0.7),
    "k1_t8": C.CIFAR.replace(k=1, t=8, severity=10.0), "t0": C.IMAGENET.replace(t=0),
}


@pytest.mark.slow
@cpu
@pytest.mark.parametrize("name", DECODE_CFGS)
def test_decode_equals_numpy(name):
    from dali_ipmix import triton_kernels as TK
    cfg = DECODE_CFGS[name]
    u = np.random.default_rng(3).random((40, 2, T.uniform_size(cfg)), dtype=np.float32)
    u[0, 0] = 0.0                                           # the edges of every draw
    u[0, 0, 1] = 0.5                                        # (not all weights 0: 0 / 0)
    u[1, 0] = np.nextafter(np.float32(1), np.float32(0))
    u[2, 0] = 0.5
    got = TK.decode(torch.from_numpy(u), cfg).numpy()
    np.testing.assert_array_equal(got, T.decode_flat(u, cfg))


VIEW_CFGS = {
    "imagenet_jsd": IMAGENET64,
    "cifar": C.CIFAR,
    "all_ops_k2_t4": IMAGENET64.replace(jsd=False, all_ops=True, k=2, t=4),
    "clamp_paper": IMAGENET64.replace(overflow="clamp", depth_min=1, k=4),
    "t0": C.CIFAR.replace(t=0),
}


def _views_case(cfg, photos64, partners64, seed=11):
    size = cfg.image_size
    xs = [np.asarray(R.Image.fromarray(p).resize((size, size))) for p in photos64]
    fs = [np.asarray(R.Image.fromarray(p).resize((size, size))) for p in partners64]
    tapes = np.stack([T.sample(np.random.default_rng(seed + a), cfg, len(xs))
                      for a in range(cfg.n_aug)], 1)
    ref = np.stack([R.ipmix_views(xs[i], fs[i], tapes[i], cfg) for i in range(len(xs))])
    return _batch(xs), _batch(fs), torch.from_numpy(tapes), ref


# Pictures per config: six for the training recipe, three for the variants (each picture is
# another draw of every view's ops; the interpreter's time grows with them)
VIEW_PICTURES = {"imagenet_jsd": 6}


@pytest.mark.slow
@cpu
@pytest.mark.parametrize("name", VIEW_CFGS)
def test_views_bit_exact_with_reference(name, photos64, partners64):
    cfg, n = VIEW_CFGS[name], VIEW_PICTURES.get(name, 3)
    x, f, tapes, ref = _views_case(cfg, photos64[:n], partners64[:n])
    out = fused.ipmix_views(x, f, tapes, cfg, impl="triton").numpy()
    assert out.shape == (n, cfg.views, 3, cfg.image_size, cfg.image_size)
    np.testing.assert_array_equal(out, ref)


# Sizes that are not whole tiles: the step and finish kernels work on tiles of BLOCK_PIXELS
# (256) pixels and the table kernel scans histograms BLOCK_SCAN (1024) pixels at a time, so
# only such sizes run the masked last tile and the histogram's padding correction (64 px is
# 4096 pixels: whole tiles).  31 px: one partial tile of each; 97 px: 9409 pixels, 36 tiles and
# 9 scans plus partial ones; 250 px: 62,500 pixels.  Batches that are not powers of two.  The
# interpreter is slow (~1 s per 10,000 pixels and kernel): 250 px runs one picture through the
# ops that read whole-image statistics or move pixels.
ODD_OPS = {31: (5, OPS), 250: (1, ("equalize", "autocontrast", "rotate"))}


def _odd_cfg(size, **kw):
    return C.IMAGENET.replace(image_size=size, all_ops=True,
                              patch_sizes=tuple(p for p in (4, 8, 16, 32, 64) if p < size) + (size,),
                              **kw)


@pytest.mark.slow
@cpu
@pytest.mark.parametrize("size", sorted(ODD_OPS))
def test_image_ops_on_sizes_that_are_not_whole_tiles(size):
    B, names = ODD_OPS[size]
    images = photo_crops(size, B, seed=size)
    batch = _batch(images)
    for name in names:
        mag = MAGNITUDES[name][0]
        m = C.IDENTITY_MAGNITUDE.get(name, 0.0) if mag is None else mag
        out = fused.image_op(batch, torch.full((B,), OPS.index(name)), torch.full((B,), float(m)),
                             OPS, impl="triton").numpy()
        m32 = None if mag is None else float(np.float32(mag))
        ref = np.stack([R.image_op(im, name, m32) for im in images])
        assert _diff(out, ref).max() == 0, (size, name, mag)


@pytest.mark.slow
@cpu
@pytest.mark.parametrize("size, batch, k, t", [(31, 5, 3, 3), (97, 3, 2, 2)])
def test_views_on_sizes_that_are_not_whole_tiles(size, batch, k, t):
    # the JSD triple, every op; channels-last stores too at 31 px
    cfg = _odd_cfg(size, k=k, t=t)
    xs, fs = photo_crops(size, batch, seed=size + 1), photo_crops(size, batch, seed=size + 2)
    tapes = np.stack([T.sample(np.random.default_rng(size + a), cfg, batch)
                      for a in range(cfg.n_aug)], 1)
    ref = np.stack([R.ipmix_views(xs[i], fs[i], tapes[i], cfg) for i in range(batch)])
    out = fused.ipmix_views(_batch(xs), _batch(fs), torch.from_numpy(tapes), cfg, impl="triton")
    assert out.shape == (batch, 3, 3, size, size)
    np.testing.assert_array_equal(out.numpy(), ref)
    if size == 31:
        last = fused.ipmix_views(_batch(xs), _batch(fs), torch.from_numpy(tapes), cfg,
                                 channels_last_out=True, impl="triton")
        np.testing.assert_array_equal(last.numpy(), ref.transpose(0, 1, 3, 4, 2))


@pytest.mark.slow
@cpu
def test_uniforms_path_dtypes_and_layouts(photos64, partners64):
    # two pictures: the dtypes and layouts are what this checks (the views' values are checked
    # on six pictures per config above); each case is one interpreted run of the kernels
    cfg = IMAGENET64.replace(k=2, t=2)
    x, f = _batch(photos64[:2]), _batch(partners64[:2])
    u = torch.from_numpy(np.random.default_rng(5).random((2, 2, T.uniform_size(cfg)),
                                                        dtype=np.float32))
    views, tapes = fused.ipmix_views_from_uniforms(x, f, u, cfg, impl="triton")
    np.testing.assert_array_equal(tapes.numpy(), T.decode_flat(u.numpy(), cfg))
    torch_views, _ = fused.ipmix_views_from_uniforms(x, f, u, cfg, impl="torch")
    # the torch code mixes in another float32 order
    torch.testing.assert_close(views, torch_views, atol=2e-6, rtol=0)
    for dtype in (torch.bfloat16, torch.float16):
        low, _ = fused.ipmix_views_from_uniforms(x, f, u, cfg, dtype, impl="triton")
        assert low.dtype == dtype
        torch.testing.assert_close(low, views.to(dtype), atol=0, rtol=0)
    last, _ = fused.ipmix_views_from_uniforms(x, f, u, cfg, channels_last_out=True, impl="triton")
    torch.testing.assert_close(last, views.permute(0, 1, 3, 4, 2), atol=0, rtol=0)


@pytest.mark.slow
@cpu
def test_launches_per_batch(photos64, partners64, monkeypatch):
    # 2t + 2 launches whatever the batch size and k
    from dali_ipmix import triton_kernels as TK
    launched = []
    real = TK._launch
    monkeypatch.setattr(TK, "_launch", lambda kernel, grid, *a, **kw: (launched.append(kernel),
                                                                       real(kernel, grid, *a, **kw)))
    for cfg, B in ((C.CIFAR.replace(k=1, t=3), 2), (C.CIFAR.replace(k=4, t=3), 6)):
        launched.clear()
        x = torch.zeros((B, 32, 32, 3), dtype=torch.uint8)
        u = torch.rand((B, cfg.n_aug, T.uniform_size(cfg)))
        fused.ipmix_views_from_uniforms(x, x, u, cfg, impl="triton")
        assert len(launched) == 2 * cfg.t + 2


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    from dali_ipmix import triton_kernels as TK
    monkeypatch.setattr(TK, "INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        TK.decode(torch.zeros((1, T.uniform_size(C.CIFAR))), C.CIFAR)


# ---------------------------------------------------------------------------------------------
# Compiled, on a GPU.

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["imagenet_jsd", "cifar", "all_ops_k2_t4"])
def test_cuda_views_match_reference(name, photos64, partners64):
    cfg = VIEW_CFGS[name]
    x, f, tapes, ref = _views_case(cfg, photos64, partners64)
    out = fused.ipmix_views(x.cuda(), f.cuda(), tapes.cuda(), cfg, impl="triton").cpu().numpy()
    # libdevice's powf may differ from glibc's in the last bit: rare multiply pixels move
    d = np.abs(out - ref)
    assert d.mean() < 2e-3 and (d > 1e-5).mean() < 1e-3, (d.mean(), (d > 1e-5).mean())


@pytest.mark.gpu
def test_cuda_image_ops_and_decode(photos64):
    for name in OPS:
        for mag in MAGNITUDES[name]:
            m = C.IDENTITY_MAGNITUDE.get(name, 0.0) if mag is None else mag
            out = fused.image_op(_batch(photos64).cuda(), torch.full((6,), OPS.index(name)),
                                  torch.full((6,), float(m)), OPS, impl="triton").cpu().numpy()
            ref = np.stack([R.image_op(im, name, None if mag is None else float(np.float32(mag)))
                            for im in photos64])
            assert _diff(out, ref).max() == 0, (name, mag)
    from dali_ipmix import triton_kernels as TK
    cfg = C.IMAGENET
    u = np.random.default_rng(3).random((256, 2, T.uniform_size(cfg)), dtype=np.float32)
    got = TK.decode(torch.from_numpy(u).cuda(), cfg).cpu().numpy()
    want = T.decode_flat(u, cfg)
    lay = T.TapeLayout(cfg.k, cfg.t)
    _, _, gs = lay.unpack(got)
    _, _, ws = lay.unpack(want)
    exact = [T.SF[n] for n in T.STEP_FIELDS if n not in ("a", "b")]
    np.testing.assert_array_equal(gs[..., exact], ws[..., exact])     # integers, magnitudes
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)       # pow / log last bits


_COMPILE_CHECK = r"""
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dali_ipmix import config as C, fused, tape as T, triton_kernels as TK

TYPES = {torch.uint8: "u8", torch.int32: "i32", torch.float32: "fp32", torch.float64: "fp64",
         torch.float16: "fp16", torch.bfloat16: "bf16"}
seen = {}

def compile_instead(kernel, grid, *args, **kw):
    # the host code's real arguments, compiled for Hopper instead of launched
    warps = kw.pop("num_warps", 4)
    names = kernel.arg_names
    sig = {n: "constexpr" if n in kw else (("*" + TYPES[a.dtype]) if isinstance(a, torch.Tensor)
           else "fp32" if isinstance(a, float) else "i32") for n, a in zip(names, list(args) + [None] * len(kw))}
    # keyed by the argument types too: the finish kernel stores float16, bfloat16 or float32
    key = (kernel.fn.__name__, tuple(sorted(kw.items())), tuple(sorted(sig.items())))
    if key not in seen:
        src = ASTSource(kernel, sig, constexprs=dict(kw))
        seen[key] = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                   options={"enable_fp_fusion": False, "num_warps": warps})

TK._launch = compile_instead
TK._check_device = lambda x: None
for cfg in (C.IMAGENET, C.CIFAR.replace(k=8, t=1, overflow="clamp", jsd=False)):
    S = cfg.image_size
    x = torch.zeros((2, S, S, 3), dtype=torch.uint8)
    u = torch.rand((2, cfg.n_aug, T.uniform_size(cfg)))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        fused.ipmix_views_from_uniforms(x, x, u, cfg, dtype, impl="triton")
for name, _, sig in seen:
    if name == "_finish_kernel":
        print("finish stores", dict(sig)["out_ptr"])
print(len(seen), "kernels compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    # Compiled Triton is stricter than its interpreter (constexpr globals, types across branches):
    # the kernels, with the arguments the host code really passes, must compile for sm_90.
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernels compiled" in done.stdout
    stores = {line.split()[-1] for line in done.stdout.splitlines() if line.startswith("finish stores")}
    assert stores == {"*fp16", "*bf16", "*fp32"}, done.stdout
