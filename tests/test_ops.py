"""The readable DALI backend against the NumPy/PIL reference, op by op, on photographs."""
import numpy as np
import pytest

from dali_ipmix import config as C
from dali_ipmix import ops, reference as R
from conftest import MAGNITUDES

# The ops whose DALI code is not bit-exact with PIL; every other op (a new one too) must be.
WITHIN_ONE = {"rotate", "shear_x", "shear_y", "autocontrast"}
OPENCV_FORMULA = {"equalize"}


def _diff(out, ref):
    return np.abs(out.astype(np.int32) - ref.astype(np.int32))


@pytest.mark.parametrize("name", C.ALL_IMAGE_OPS)
def test_image_op_matches_pil(name, photos64):
    for mag in MAGNITUDES[name]:
        out = ops.run_image_op(name, photos64, mag)
        ref = np.stack([R.image_op(im, name, mag) for im in photos64])
        assert out.shape == ref.shape and out.dtype == np.uint8
        d = _diff(out, ref)
        if name in WITHIN_ONE:
            # PIL's bilinear AFFINE is emulated, autocontrast computed in float32; only float
            # rounding at truncation boundaries differs (observed: < 1% of values, by 1).
            assert d.mean() < 0.05 and d.max() <= 1, (name, mag, d.mean(), d.max())
        elif name in OPENCV_FORMULA:
            # equalize: DALI's fn.equalize uses OpenCV's LUT formula, not PIL's.  Documented
            # bound (README): mean abs diff <= 12 levels (8.5 seen on these photos); the fused
            # backend is PIL-exact.
            assert 1 <= d.mean() <= 12, (name, d.mean())
        else:
            assert d.max() == 0, (name, mag, d.max())
        if mag is not None and name not in C.PARAMLESS_OPS:
            assert (ref != np.stack(photos64)).any(), f"{name} {mag} should change the image"


@pytest.mark.parametrize("name", sorted(C.IDENTITY_MAGNITUDE))
def test_identity_magnitude_is_exact_identity(name, photos64):
    out = ops.run_image_op(name, photos64[:3], C.IDENTITY_MAGNITUDE[name])
    if name == "autocontrast":     # cutoff 0 still stretches: compare with PIL instead
        ref = np.stack([R.image_op(im, name, 0) for im in photos64[:3]])
        assert _diff(out, ref).max() <= 1
    else:
        np.testing.assert_array_equal(out, np.stack(photos64[:3]))


def test_per_image_magnitudes(photos64):
    mags = [0, 1, 2, -3, 5, -8]
    out = ops.run_image_op("translate_x", photos64, mags)
    for o, im, m in zip(out, photos64, mags):
        np.testing.assert_array_equal(o, R.image_op(im, "translate_x", m))


MIX_CASES = [
    (0.7, 0.2, (3, 5, 20, 30)),        # interpolation, scar window
    (1.8, -0.9, None),                 # extrapolation over the whole image: wraps
    (1.3, -0.6, (0, 0, 64, 64)),       # the same as an explicit full window
    (1.1, -0.05, (40, 50, 24, 14)),    # window touching the bottom/right edges
]


@pytest.mark.slow
@pytest.mark.parametrize("name", C.MIXING_OPS)
@pytest.mark.parametrize("overflow", ["wrap", "clamp"])
def test_mixing_op_matches_formula(name, overflow, photos64, partners64):
    for a, b, window in MIX_CASES:
        out = ops.run_mixing_op(name, photos64, partners64, a, b, 0.37, 12345, window, overflow)
        ref = np.stack([R.mixing_op(x1, x2, name, a, b, 0.37, 12345, window, overflow)
                        for x1, x2 in zip(photos64, partners64)])
        np.testing.assert_array_equal(out, ref, err_msg=f"{name} a={a} b={b} {window}")
        if window is not None and window != (0, 0, 64, 64):
            top, left, h, w = window
            outside = np.ones(out.shape[1:3], bool)
            outside[top:top + h, left:left + w] = False
            np.testing.assert_array_equal(out[:, outside], np.stack(photos64)[:, outside])


def test_add_wraps_like_the_official_code():
    x1 = np.full((1, 8, 8, 3), 250, np.uint8)
    x2 = np.full((1, 8, 8, 3), 250, np.uint8)
    # a + b = 1.5 > 1: value ((1.5 * (2*250/255 - 1)) + 1) / 2 * 255 = 370.0... -> wraps
    want = int(np.float32(((np.float32(1.5) * (np.float32(250) / 255 * 2 - 1)) + 1) / 2) * 255) % 256
    wrap = ops.run_mixing_op("add", x1, x2, a=1.5, b=0.0)
    clamp = ops.run_mixing_op("add", x1, x2, a=1.5, b=0.0, overflow="clamp")
    assert wrap[0, 0, 0, 0] == want and want < 250
    assert clamp[0, 0, 0, 0] == 255


def test_random_masks_select_per_pixel_or_per_element():
    x1 = np.zeros((1, 32, 32, 3), np.uint8)
    x2 = np.full((1, 32, 32, 3), 255, np.uint8)
    pix = ops.run_mixing_op("random_pixels", x1, x2, p=0.3, seed=7)[0]
    ele = ops.run_mixing_op("random_elems", x1, x2, p=0.3, seed=7)[0]
    # one mask shared by the channels vs independent per element
    assert (pix.min(-1) == pix.max(-1)).all()
    assert (ele.min(-1) != ele.max(-1)).any()
    # x1 where U < p: about 30 % zeros
    assert abs((pix[..., 0] == 0).mean() - 0.3) < 0.08
    other = ops.run_mixing_op("random_pixels", x1, x2, p=0.3, seed=8)[0]
    assert not np.array_equal(pix, other)


def test_bad_names_and_inputs_fail_with_one_line_errors(photos64):
    with pytest.raises(ValueError, match="unknown image op 'blur'") as e:
        ops.run_image_op("blur", photos64, 1.0)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown mixing op 'avg'"):
        ops.run_mixing_op("avg", photos64, photos64)
    with pytest.raises(ValueError, match="square"):
        ops.run_image_op("invert", [np.zeros((4, 6, 3), np.uint8)])
    with pytest.raises(ValueError, match="device"):
        ops.run_image_op("invert", photos64, device="tpu")
