"""The parameter tape: distributions match the official code's draws (IPMix_utils.py, imagenet.py), the DALI
decoder equals the NumPy decoder, and seeds behave."""
import numpy as np
import pytest
from scipy import stats

from dali_ipmix import config as C
from dali_ipmix import tape as T

N = 20000          # tapes per statistical test
P_MIN = 1e-6       # reject a distribution only when the test is overwhelmingly against it


def _sample(cfg, n=N, seed=0):
    return T.TapeLayout(cfg.k, cfg.t).unpack(T.sample(np.random.default_rng(seed), cfg, n))


def _uniform_counts_ok(values, support):
    counts = np.array([(values == s).sum() for s in support])
    assert counts.sum() == len(values), "values outside the support"
    return stats.chisquare(counts).pvalue > P_MIN


def test_layout_size_and_unpack_roundtrip():
    cfg = C.IMAGENET
    tp = T.sample(np.random.default_rng(0), cfg, 5)
    layout = T.TapeLayout(cfg.k, cfg.t)
    assert tp.shape == (5, layout.size) and tp.dtype == np.float32
    skip, chains, steps = layout.unpack(tp)
    assert chains.shape == (5, 3, len(T.CHAIN_FIELDS)) and steps.shape == (5, 3, 3, len(T.STEP_FIELDS))
    repacked = T.pack(skip, chains, steps)
    np.testing.assert_array_equal(repacked, tp)
    with pytest.raises(ValueError, match="layout k=3 t=3"):
        layout.unpack(tp[:, :-1])


@pytest.mark.parametrize("depth_min", [0, 1])
def test_chain_kind_depth_and_activity(depth_min):
    cfg = C.IMAGENET.replace(depth_min=depth_min)
    _, chains, steps = _sample(cfg)
    kind = chains[..., T.CF["kind"]].ravel()
    assert stats.binomtest(int(kind.sum()), kind.size, 0.5).pvalue > P_MIN
    depth = chains[..., T.CF["depth"]].ravel()
    assert _uniform_counts_ok(depth, range(depth_min, cfg.t + 1))
    # exactly `depth` active steps, all of the chain's kind, at the front of the chain
    active = steps[..., T.SF["active_img"]] + steps[..., T.SF["active_p"]]
    np.testing.assert_array_equal(active.sum(-1), chains[..., T.CF["depth"]])
    np.testing.assert_array_equal(active, np.sort(active, axis=-1)[..., ::-1])
    is_p = steps[..., T.SF["active_p"]] > 0
    np.testing.assert_array_equal(is_p.any(-1), (chains[..., T.CF["kind"]] == 1) & (active.sum(-1) > 0))


def test_weights_dirichlet_and_skip_uniform():
    skip, chains, _ = _sample(C.IMAGENET)
    w = chains[..., T.CF["weight"]]
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    assert (w > 0).all()
    # Dirichlet(1,1,1) marginals are Beta(1, 2)
    for i in range(3):
        assert stats.kstest(w[:, i], stats.beta(1, 2).cdf).pvalue > P_MIN
    assert stats.kstest(skip, "uniform").pvalue > P_MIN


@pytest.mark.parametrize("cfg", [C.IMAGENET, C.CIFAR, C.IMAGENET.replace(all_ops=True)],
                         ids=["imagenet", "cifar", "all_ops"])
def test_op_choice_uniform_and_magnitudes_in_official_ranges(cfg):
    _, _, steps = _sample(cfg)
    img = steps[steps[..., T.SF["active_img"]] > 0]
    op = img[:, T.SF["op"]]
    assert _uniform_counts_ok(op, range(len(cfg.ops)))
    sev = cfg.severity
    for idx, name in enumerate(cfg.ops):
        mag = img[op == idx, T.SF["mag"]]
        if name in C.SIGNED_OPS:        # random sign with p = 1/2
            assert stats.binomtest(int((mag < 0).sum()), int((mag != 0).sum()), 0.5).pvalue > P_MIN
        unsigned = np.abs(mag)
        lo = C.magnitude(name, 0.1, cfg.image_size)
        hi = C.magnitude(name, sev, cfg.image_size)
        lo, hi = min(lo, hi), max(lo, hi)
        assert unsigned.min() >= lo - 1e-5 and unsigned.max() <= hi + 1e-5, name
        if name in ("posterize", "rotate", "solarize", "translate_x", "translate_y"):
            np.testing.assert_array_equal(unsigned, np.round(unsigned))   # int_parameter
    if cfg is C.IMAGENET:   # severity 1: rotate by int(3 L) <= 2 degrees, posterize to 4 bits
        rot = np.abs(img[op == cfg.ops.index("rotate"), T.SF["mag"]])
        assert set(np.unique(rot)) == {0.0, 1.0, 2.0}
        assert set(np.unique(img[op == cfg.ops.index("posterize"), T.SF["mag"]])) == {4.0}
        sol = img[op == cfg.ops.index("solarize"), T.SF["mag"]]
        assert sol.min() >= 231 and sol.max() <= 254


@pytest.mark.parametrize("cfg", [C.IMAGENET, C.CIFAR], ids=["imagenet", "cifar"])
def test_patch_steps(cfg):
    _, _, steps = _sample(cfg)
    p = steps[steps[..., T.SF["active_p"]] > 0]
    S = cfg.image_size
    assert _uniform_counts_ok(p[:, T.SF["mix"]], range(4))
    top, left = p[:, T.SF["top"]], p[:, T.SF["left"]]
    h, w = p[:, T.SF["height"]], p[:, T.SF["width"]]
    assert (top >= 0).all() and (left >= 0).all() and (h >= 2).all() and (w >= 2).all()
    # the square's side is the drawn patch size; square with p = 1/2
    square = (h == w) & np.isin(h, cfg.patch_sizes)
    # scar rectangles are square with side s by chance 1/(s-1)^2, so the share is a bit over 1/2
    chance = np.mean([1 / (s - 1) ** 2 for s in cfg.patch_sizes])
    expected = 0.5 + 0.5 * chance
    assert stats.binomtest(int(square.sum()), len(p), expected).pvalue > P_MIN
    # every window fits: the scar lies inside the s x s box at (top, left), which fits in S
    assert (top + h <= S).all() and (left + w <= S).all()
    sizes_sq = h[(h == w)]
    for s in cfg.patch_sizes:
        assert (sizes_sq == s).sum() > 0
    # self-mix partner with p = 1/2 on ImageNet, never on CIFAR
    self_mix = p[:, T.SF["self_mix"]]
    if cfg.self_mix:
        assert stats.binomtest(int(self_mix.sum()), len(p), 0.5).pvalue > P_MIN
    else:
        assert self_mix.sum() == 0
    # whole-image (pixel-level) case: probability 1/len(sizes) * 1/2 per P-step (square branch)
    whole = (h == S) & (w == S)
    expected = 0.5 / len(cfg.patch_sizes)
    assert stats.binomtest(int(whole.sum()), len(p), expected).pvalue > P_MIN


def test_scar_sides_uniform_in_2_to_s():
    cfg = C.CIFAR.replace(patch_sizes=(16,), square_prob=0.0)
    _, _, steps = _sample(cfg)
    p = steps[steps[..., T.SF["active_p"]] > 0]
    assert _uniform_counts_ok(p[:, T.SF["height"]], range(2, 17))
    assert _uniform_counts_ok(p[:, T.SF["width"]], range(2, 17))
    assert _uniform_counts_ok(p[:, T.SF["top"]], range(0, 32 - 16 + 1))


def test_get_ab_distribution():
    cfg = C.IMAGENET
    _, _, steps = _sample(cfg)
    p = steps[steps[..., T.SF["active_p"]] > 0]
    a, b = p[:, T.SF["a"]], p[:, T.SF["b"]]
    interp = a < 1
    assert stats.binomtest(int(interp.sum()), len(a), 0.5).pvalue > P_MIN
    beta = cfg.beta
    # interpolation: a ~ Beta(beta, 1), b ~ Beta(1, beta)
    assert stats.kstest(a[interp], stats.beta(beta, 1).cdf).pvalue > P_MIN
    assert stats.kstest(b[interp], stats.beta(1, beta).cdf).pvalue > P_MIN
    # extrapolation: a = 1 + Beta(1, beta), b = -Beta(1, beta)
    assert stats.kstest(a[~interp] - 1, stats.beta(1, beta).cdf).pvalue > P_MIN
    assert stats.kstest(-b[~interp], stats.beta(1, beta).cdf).pvalue > P_MIN
    assert stats.kstest(p[:, T.SF["p"]], "uniform").pvalue > P_MIN
    seeds = p[:, T.SF["seed"]]
    assert (seeds == np.floor(seeds)).all() and seeds.max() < T.SEED_RANGE


def _dali_decode(cfg, u_view, u_chain, u_step):
    from nvidia.dali import fn, pipeline_def
    n = len(u_view)

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        src = [fn.external_source(source=(lambda a: lambda: list(a))(arr), batch=True)
               for arr in (u_view, u_chain, u_step)]
        return T.pack(*T.decode(*src, cfg, T.DaliArrays()), xp=T.DaliArrays())

    p = pipe()
    p.build()
    (out,) = p.run()
    return np.stack([np.asarray(out.at(i)) for i in range(n)])


@pytest.mark.parametrize("cfg", [C.IMAGENET, C.CIFAR.replace(all_ops=True, depth_min=1)],
                         ids=["imagenet", "cifar_all_ops_paper_depth"])
def test_dali_decoder_equals_numpy_decoder(cfg):
    u = T.draw_uniforms(np.random.default_rng(3), cfg, 64)
    want = T.pack(*T.decode(*u, cfg))
    got = _dali_decode(cfg, *u)
    # identical up to float32 libm differences in log/pow (weights, a, b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_dali_tape_seeded():
    from nvidia.dali import pipeline_def

    def run(seed):
        @pipeline_def(batch_size=8, num_threads=1, device_id=None, seed=seed)
        def pipe():
            return T.dali_tape(C.IMAGENET)
        p = pipe()
        p.build()
        return np.stack([np.asarray(p.run()[0].at(i)) for i in range(8)])

    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(r) for r in a}) == 8        # every sample draws its own tape


def test_op_indices_stay_when_an_op_is_appended():
    # a new op is appended to the table: the default ops and the --all-ops ops keep their indices,
    # so recorded tapes (op index = place in cfg.ops) still mean the same ops
    default, every = C.op_lists(C.OP_TABLE)
    assert (default, every) == (C.IMAGE_OPS, C.ALL_IMAGE_OPS)
    for trial in (C.ImageOp("trial", "point"), C.ImageOp("trial", "point", all_ops_only=True)):
        new_default, new_every = C.op_lists(C.OP_TABLE + (trial,))
        assert new_every == every + ("trial",)
        assert new_default[:len(default)] == default
        assert new_default == default + (() if trial.all_ops_only else ("trial",))


def test_layout_offsets_match_unpack():
    layout = T.TapeLayout(3, 2)
    tape = np.arange(layout.size, dtype=np.float32)
    skip, chains, steps = layout.unpack(tape)
    assert tape[layout.SKIP] == skip
    for i in range(3):
        for name in T.CHAIN_FIELDS:
            assert tape[layout.chain_field(i, name)] == chains[i, T.CF[name]]
        for j in range(2):
            np.testing.assert_array_equal(tape[layout.step_slice(i, j)], steps[i, j])
