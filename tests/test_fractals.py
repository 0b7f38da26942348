"""The procedural mixing set: IFS sampling maths, degeneracy checks, determinism, files and the CLI."""
import math
import os

import numpy as np
import pytest
from PIL import Image

from dali_ipmix.cli import main
from dali_ipmix.data import fractals as F

SIZE = 128
COUNT = 16
SEED = 7


def _decode(path):
    with Image.open(path) as im:
        assert im.format == "JPEG"
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fractals") / "set"
    paths = F.generate_fractals(out, COUNT, size=SIZE, seed=SEED, jobs=2)
    return out, paths


# ---------------------------------------------------------------------------------------------------
# IFS sampling (Anderson & Farrell's sigma-factor constraint)
def test_sample_svs_meets_the_sigma_factor_constraint():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 8))
        alpha = rng.uniform((5 + n) / 2, (6 + n) / 2)
        s = F.sample_svs(rng, n, alpha)
        assert s.shape == (n, 2)
        assert np.all(s >= -1e-12) and np.all(s <= 1 + 1e-12)
        assert np.all(s[:, 0] >= s[:, 1] - 1e-12)
        assert math.isclose((s[:, 0] + 2 * s[:, 1]).sum(), alpha, rel_tol=0, abs_tol=1e-9)


def test_sample_system_is_contractive_with_the_documented_ranges():
    rng = np.random.default_rng(1)
    seen_n = set()
    for _ in range(300):
        system = F.sample_system(rng)
        n = system.shape[0]
        seen_n.add(n)
        assert system.shape == (n, 2, 3) and 2 <= n <= 7
        sv = np.linalg.svd(system[:, :, :2], compute_uv=False)  # (n, 2), descending
        assert np.all(sv <= 1 + 1e-9)
        weighted = (sv[:, 0] + 2 * sv[:, 1]).sum()
        assert (5 + n) / 2 - 1e-9 <= weighted <= (6 + n) / 2 + 1e-9
        assert np.all(np.abs(system[:, :, 2]) <= 1)
    assert seen_n == set(range(2, 8))


def test_chaos_game_points_are_finite_and_cover_the_attractor():
    # Sierpinski triangle: three half-size copies; its points must stay inside the triangle hull.
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]])
    system = np.zeros((3, 2, 3))
    system[:, :, :2] = 0.5 * np.eye(2)
    system[:, :, 2] = 0.5 * corners
    pts = F.chaos_game(system, np.random.default_rng(0))
    assert pts.shape[0] == 2 and pts.shape[1] >= F.IFS_POINTS
    assert np.isfinite(pts).all()
    x, y = pts
    assert y.min() >= -1e-9 and y.max() <= 1 + 1e-9
    assert np.all(y <= 2 * x + 1e-9) and np.all(y <= 2 * (1 - x) + 1e-9)
    # Equal |det| -> each corner third gets about a third of the points.
    share = np.array([np.mean((x < 0.5) & (y < 0.5)), np.mean((x >= 0.5) & (y < 0.5)), np.mean(y >= 0.5)])
    assert np.all(np.abs(share - 1 / 3) < 0.02)
    assert F.density_ok(F.render_density(pts, SIZE))


# ---------------------------------------------------------------------------------------------------
# Degeneracy checks
def _line_density(size, thickness=1):
    d = np.zeros((size, size), np.float32)
    for k in range(thickness):
        idx = np.arange(size - k)
        d[idx, idx + k] = 1.0
    return d


def _dust(size, share):
    d = np.zeros(size * size, np.float32)
    d[np.random.default_rng(0).choice(size * size, int(share * size * size), replace=False)] = 1.0
    return d.reshape(size, size)


def _failed_bounds(density):
    st = F.density_stats(density)
    return {name for name, bad in [("blank", st["coverage"] < F.MIN_COVERAGE),
                                   ("filled", st["coverage"] > F.MAX_COVERAGE),
                                   ("line", st["spread_minor"] < F.MIN_SPREAD_MINOR),
                                   ("point", st["spread_major"] < F.MIN_SPREAD_MAJOR)] if bad}


# Each case names the bound that must catch it, so every bound is exercised on its own.
@pytest.mark.parametrize("name, density, bound", [
    ("blank", np.zeros((SIZE, SIZE), np.float32), "blank"),
    ("sparse dust", _dust(SIZE, 0.01), "blank"),
    ("single colour (filled frame)", np.ones((SIZE, SIZE), np.float32), "filled"),
    ("diagonal line", _line_density(SIZE), "line"),
    ("thick line", _line_density(SIZE, thickness=6), "line"),
    ("horizontal band", np.pad(np.ones((6, SIZE), np.float32), ((61, 61), (0, 0))), "line"),
    ("point-like blob", np.pad(np.ones((26, 26), np.float32), ((51, 51), (51, 51))), "point"),
])
def test_density_check_rejects_degenerate_renders(name, density, bound):
    assert bound in _failed_bounds(density), (name, F.density_stats(density))
    assert not F.density_ok(density), name


def test_density_check_accepts_a_spread_out_texture():
    assert F.density_ok(_dust(SIZE, 0.2)) and not _failed_bounds(_dust(SIZE, 0.2))


def _render_system(system):
    return F.render_density(F.chaos_game(np.asarray(system, float), np.random.default_rng(0)), SIZE)


def test_density_check_rejects_degenerate_systems():
    # All maps squash y to 0 -> the attractor is a segment.
    line = [[[0.5, 0.0, -0.5], [0.0, 0.0, 0.0]], [[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]]]
    # Maps with tiny minor singular values along one tilted direction -> a thin tilted segment.
    c, s = math.cos(0.5), math.sin(0.5)
    rot = np.array([[c, -s], [s, c]])
    thin = rot @ np.diag([0.55, 0.002]) @ rot.T
    tilted = [np.c_[thin, rot @ [b, 0.0]] for b in (-0.6, 0.0, 0.6)]
    # Zero matrices -> every point lands on one of the translations.
    points = [[[0.0, 0.0, -0.3], [0.0, 0.0, 0.2]], [[0.0, 0.0, 0.4], [0.0, 0.0, -0.1]]]
    for name, system in [("line", line), ("tilted thin", tilted), ("points", points)]:
        assert not F.density_ok(_render_system(system)), (name, F.density_stats(_render_system(system)))


def test_picture_check_rejects_flat_two_tone_and_noise():
    flat = np.full((SIZE, SIZE, 3), (40, 120, 200), np.uint8)
    halves = flat.copy()
    halves[:, SIZE // 2:] = (230, 30, 60)
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    for name, picture in [("flat", flat), ("two halves", halves), ("white noise", noise)]:
        assert not F.picture_ok(picture), name
    assert F.picture_ok(F.render_orbit_trap(np.random.default_rng(3), SIZE))


# ---------------------------------------------------------------------------------------------------
# Generated files
def test_layout_and_jpeg_files(run):
    out, paths = run
    n_ifs, n_orbit = F.split_counts(COUNT, F.DEFAULT_IFS_RATIO)
    assert (n_ifs, n_orbit) == (12, 4)
    assert sorted(os.listdir(out / "ifs")) == [f"{i:05d}.jpg" for i in range(n_ifs)]
    assert sorted(os.listdir(out / "orbit")) == [f"{i:05d}.jpg" for i in range(n_orbit)]
    assert [os.path.relpath(p, out) for p in paths] == (
        [f"ifs/{i:05d}.jpg" for i in range(n_ifs)] + [f"orbit/{i:05d}.jpg" for i in range(n_orbit)])
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
            assert not im.info.get("progressive") and not im.info.get("progression")  # baseline for nvJPEG


def test_every_generated_fractal_passes_the_bounds(run):
    out, paths = run
    n_ifs, _ = F.split_counts(COUNT, F.DEFAULT_IFS_RATIO)
    for i, p in enumerate(paths):
        picture = _decode(p)
        assert F.picture_ok(picture), p
        if i < n_ifs:
            # Re-draw image i from its own generator: the file is that picture, and its density passes.
            rgb, density = F.render_ifs(np.random.default_rng([SEED, i]), SIZE, return_density=True)
            assert F.density_ok(density), (p, F.density_stats(density))
            assert np.abs(rgb.astype(int) - picture).mean() < 6, p
    # Pictures within a run are distinct.
    first = [_decode(p).astype(int) for p in paths]
    for a in range(len(first)):
        for b in range(a + 1, len(first)):
            assert np.abs(first[a] - first[b]).mean() > 10, (paths[a], paths[b])


def test_same_seed_gives_byte_identical_files_for_any_jobs(run, tmp_path):
    out, paths = run
    again = F.generate_fractals(tmp_path / "again", COUNT, size=SIZE, seed=SEED, jobs=1)
    assert [os.path.relpath(p, tmp_path / "again") for p in again] == [os.path.relpath(p, out) for p in paths]
    for a, b in zip(paths, again):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read(), a


@pytest.mark.slow
def test_different_seeds_give_different_pictures(run, tmp_path):
    out, paths = run
    other = F.generate_fractals(tmp_path / "other", COUNT, size=SIZE, seed=SEED + 1, jobs=2)
    for a, b in zip(paths, other):
        assert np.abs(_decode(a).astype(int) - _decode(b)).mean() > 10, (a, b)


def test_ifs_ratio_splits_the_set(tmp_path):
    paths = F.generate_fractals(tmp_path / "s", 4, size=96, seed=1, ifs_ratio=0.0, jobs=1)
    assert sorted(os.listdir(tmp_path / "s")) == ["orbit"] and len(paths) == 4


# ---------------------------------------------------------------------------------------------------
# CLI
def test_cli_refuses_a_non_empty_out_without_overwrite(tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    rc = main(["fractals", "--out", str(busy), "--count", "2", "--size", "96", "--jobs", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert str(busy) in err and "--overwrite" in err
    assert sorted(os.listdir(busy)) == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"


def test_cli_overwrite_replaces_only_the_generated_folders(tmp_path, capsys):
    out = tmp_path / "set"
    (out / "ifs").mkdir(parents=True)
    (out / "ifs" / "99999.jpg").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    preview = tmp_path / "sheet.png"
    rc = main(["fractals", "--out", str(out), "--count", "4", "--size", "96", "--seed", "3", "--jobs", "1",
               "--overwrite", "--preview", str(preview)])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert sorted(os.listdir(out / "ifs")) == ["00000.jpg", "00001.jpg", "00002.jpg"]
    assert sorted(os.listdir(out / "orbit")) == ["00000.jpg"]
    assert (out / "notes.txt").read_text() == "mine"
    line, = stdout.strip().splitlines()
    assert "4 images" in line and "img/s" in line and str(out) in line
    with Image.open(preview) as sheet:
        assert sheet.format == "PNG" and sheet.width > 4 * 96 and sheet.height >= 96


def test_cli_rejects_a_bad_ratio(tmp_path, capsys):
    rc = main(["fractals", "--out", str(tmp_path / "x"), "--count", "2", "--ifs-ratio", "1.5"])
    assert rc == 2 and "--ifs-ratio" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_refuses_to_replace_an_existing_preview(tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    sheet.write_bytes(b"my picture")
    rc = main(["fractals", "--out", str(tmp_path / "set"), "--count", "2", "--size", "96", "--jobs", "1",
               "--preview", str(sheet)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--preview" in err and "--overwrite" in err
    assert sheet.read_bytes() == b"my picture" and not (tmp_path / "set").exists()   # before any work


def _failing_render(fail_at, exc):
    real = F.render_fractal

    def render(index, *a, **kw):
        if index == fail_at:
            raise exc
        return real(index, *a, **kw)
    return render


def test_an_interrupted_run_leaves_no_partial_set(tmp_path, capsys, monkeypatch):
    from dali_ipmix import readers
    from dali_ipmix.errors import UserError
    out = tmp_path / "set"
    monkeypatch.setattr(F, "render_fractal", _failing_render(2, KeyboardInterrupt()))
    try:
        rc = main(["fractals", "--out", str(out), "--count", "4", "--size", "96", "--jobs", "1"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C was not handled")
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    with pytest.raises(UserError, match="no pictures found"):     # nothing that looks like a set
        readers.picture_files(out)
    assert sorted(os.listdir(tmp_path)) == ["set"]                 # and no stray temporary folder
    # an interrupted --overwrite keeps the earlier complete set as it was
    monkeypatch.undo()
    F.generate_fractals(out, 4, size=96, seed=3, jobs=1)
    before = {p: (out / p).read_bytes() for p in readers.picture_files(out)}
    monkeypatch.setattr(F, "render_fractal", _failing_render(3, RuntimeError("worker died")))
    with pytest.raises(RuntimeError, match="worker died"):
        F.generate_fractals(out, 6, size=96, seed=4, jobs=1, overwrite=True)
    assert {p: (out / p).read_bytes() for p in readers.picture_files(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["set"]


def test_a_sigterm_leaves_no_stage_and_stages_of_dead_runs_are_removed(tmp_path):
    import signal
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".set.incomplete-{dead}-x1" / "ifs").mkdir(parents=True)    # a SIGKILLed run's
    script = ("import os, signal, sys\n"
              "from dali_ipmix.data import fractals as F\n"
              "from dali_ipmix.cli import main\n"
              "real = F.render_fractal\n"
              "def render(index, *a, **kw):\n"
              "    if index == 2:\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return real(index, *a, **kw)\n"
              "F.render_fractal = render\n"
              "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", script, "fractals", "--out", str(tmp_path / "set"),
                           "--count", "4", "--size", "64", "--jobs", "1"], env=dict(os.environ, PYTHONPATH=root),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and "interrupted" in done.stderr, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["set"]      # neither its stage nor the dead run's
    assert done.returncode != -signal.SIGTERM


@pytest.mark.parametrize("argv, expect", [
    (["--count", "0"], "--count must be >= 1"),
    (["--size", "100000"], "--size must be in 32..4096"),
    (["--jobs", "-2"], "--jobs must be >= 1"),
    (["--preview", "{out}/sheet.png"], "is inside --out"),
])
def test_cli_refuses_values_that_cannot_be_meant(argv, expect, tmp_path, capsys):
    out = tmp_path / "set"
    argv = [a.replace("{out}", str(out)) for a in argv]
    base = ["fractals", "--out", str(out), "--count", "2", "--size", "64"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not out.exists()
