"""dali-ipmix bench on tiny generated data, CPU: every row runs, ratios come from the same run,
outputs are written without overwriting, memory peaks count worker processes."""
import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_ipmix import cli
from dali_ipmix.bench import contenders as K
from dali_ipmix.bench import report, run_bench
from dali_ipmix.bench.contenders import ReferenceDataset
from dali_ipmix.bench.data import bench_data
from dali_ipmix.bench.memory import PeakMemory
from dali_ipmix.bench.runner import ROW_NAMES, training_config
from dali_ipmix.errors import UserError

TINY = dict(image_size=32, batch_size=4, warmup=1, iters=2, threads=[1], device="cpu",
            arch="resnet18", gen_images=8, gen_pictures=4, gen_size=40, gen_classes=2)
ROW_FIELDS = {"name", "contender", "threads", "thread_kind", "torch_threads", "views", "batch_size",
              "warmup", "iters", "images_per_s", "seconds", "setup_s", "wall_s", "backend", "impl",
              "arch", "amp", "device", "host_rss_start_mb", "host_rss_peak_mb",
              "device_torch_peak_mb", "device_used_peak_mb", "error", "baseline_row", "cpu_s",
              "cpu_cores", "cpu_ms_per_image", "repetitions",
              "baseline_threads", "vs_baseline", "synthetic_row", "vs_synthetic"}
OFFICIAL = "../shared/peer/hzlsaber-IPMix"


@pytest.fixture(scope="module")
def result():
    return run_bench(**TINY, command=["test"], log=lambda msg: None)


@pytest.mark.slow
def test_every_row_reports_a_positive_rate_and_all_fields(result):
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == set(ROW_NAMES) - {"official", "official-jsd"}     # no --official given
    for name, r in rows.items():
        assert set(r) >= ROW_FIELDS, name
        assert r["error"] is None, r["error"]
        assert r["images_per_s"] > 0 and 0 < r["seconds"] < r["wall_s"] and r["setup_s"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch_size"] * r["iters"] / r["seconds"])
        assert r["host_rss_peak_mb"] >= r["host_rss_start_mb"] > 0
        assert r["device_torch_peak_mb"] is None and r["device_used_peak_mb"] is None   # CPU
    assert rows["dali-ipmix"]["views"] == rows["reference"]["views"] == rows["dali-plain"]["views"] == 1
    assert rows["dali-ipmix-jsd"]["views"] == rows["train"]["views"] == 3
    assert rows["dali-plain"]["backend"] == "none" and rows["dali-ipmix"]["backend"] == "fused"
    assert rows["train"]["arch"] == "resnet18"
    # on the CPU the kernel and model-step rows run on torch's threads, swept like the others
    assert rows["kernel"]["threads"] == rows["synthetic"]["threads"] == 1
    assert rows["kernel"]["thread_kind"] == rows["synthetic"]["thread_kind"] == "torch"
    assert rows["kernel"]["impl"] == "torch" and rows["kernel-jsd"]["views"] == 3
    assert rows["dali-ipmix"]["thread_kind"] == "dali" and rows["reference"]["thread_kind"] == "workers"
    assert rows["dali-tapes"]["backend"] == rows["dali-uniforms"]["backend"] == "none"
    # the reference rows fork DataLoader workers: their memory is counted on top of the parent's
    m = result["machine"]
    assert m["cpu_count"] >= 1 and m["versions"]["torch"] and m["versions"]["nvidia-dali"]
    assert len(m["load_average_start"]) == len(m["load_average_end"]) == 3
    assert result["data"]["images"] == 8 and result["data"]["pictures"] == 4
    assert result["command"] == ["test"] and result["settings"]["image_size"] == 32
    assert json.loads(json.dumps(result)) == result        # JSON-serialisable as is


@pytest.mark.slow
def test_ratios_come_from_the_same_run(result):
    rate = {(r["name"], r["threads"]): r["images_per_s"] for r in result["rows"]}
    for r in result["rows"]:
        ref = "reference-jsd" if r["views"] == 3 else "reference"
        assert r["baseline_row"] == ref and r["baseline_threads"] == r["threads"] or \
            r["threads"] is None
        assert r["vs_baseline"] == pytest.approx(r["images_per_s"] / rate[ref, r["baseline_threads"]])
        assert r["vs_synthetic"] == pytest.approx(r["images_per_s"] / rate["synthetic", r["threads"]])
    assert {r["name"]: r["vs_baseline"] for r in result["rows"]}["reference-jsd"] == 1.0


def test_ratios_pair_rows_by_thread_count_and_skip_missing_rows():
    rows = [dict(name="reference", views=1, threads=1, images_per_s=10.0),
            dict(name="reference", views=1, threads=2, images_per_s=20.0),
            dict(name="dali-ipmix", views=1, threads=1, images_per_s=30.0),
            dict(name="dali-ipmix", views=1, threads=2, images_per_s=30.0),
            dict(name="dali-ipmix", views=1, threads=8, images_per_s=40.0),
            dict(name="dali-ipmix-jsd", views=3, threads=2, images_per_s=6.0),
            dict(name="synthetic", views=3, threads=2, images_per_s=60.0),
            dict(name="train", views=3, threads=2, images_per_s=None, error="boom")]
    report.add_ratios(rows)
    by = {(r["name"], r["threads"]): r for r in rows}
    assert by["dali-ipmix", 1]["vs_baseline"] == 3.0
    assert by["dali-ipmix", 2]["vs_baseline"] == 1.5
    # no reference at 8 threads: its fastest measurement stands in, and the row says which
    assert by["dali-ipmix", 8]["vs_baseline"] == 2.0 and by["dali-ipmix", 8]["baseline_threads"] == 2
    assert by["dali-ipmix-jsd", 2]["vs_baseline"] is None         # no reference-jsd row measured
    assert by["dali-ipmix-jsd", 2]["vs_synthetic"] == 0.1
    assert by["dali-ipmix", 1]["vs_synthetic"] == 0.5              # the synthetic rate at 2
    assert by["train", 2]["vs_synthetic"] is None                 # a failed row has no ratio
    assert "error: train (threads 2): boom" in report.table(rows)


def test_official_rows_become_the_baseline():
    rows = [dict(name="reference", views=1, threads=2, images_per_s=10.0),
            dict(name="official", views=1, threads=2, images_per_s=20.0),
            dict(name="dali-ipmix", views=1, threads=2, images_per_s=40.0)]
    report.add_ratios(rows)
    assert rows[2]["baseline_row"] == "official" and rows[2]["vs_baseline"] == 2.0
    assert "over the official row" in report.table(rows)


@pytest.mark.slow
def test_table_has_one_line_per_row(result):
    lines = report.table(result["rows"]).splitlines()
    assert len(lines) == 2 + len(result["rows"]) + 3               # header, rule, rows, 3 notes
    assert [line.split()[0] for line in lines[2:-3]] == [r["name"] for r in result["rows"]]


def test_cli_writes_json_table_and_plot_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["bench", "--contenders", "dali-plain", "--image-size", "32", "-b", "4", "--iters", "2",
            "--warmup", "1", "--threads", "1,2", "--device", "cpu", "--gen-images", "8",
            "--gen-pictures", "4", "--gen-size", "40", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "bench.json").read_text())
    assert [(r["name"], r["threads"]) for r in saved["rows"]] == [("dali-plain", 1), ("dali-plain", 2)]
    command = saved["command"]
    assert command[:2] == ["dali-ipmix", "bench"] and "--overwrite" not in command
    assert command[command.index("--threads") + 1] == "1,2" and str(out) in command
    assert command[command.index("--batch-size") + 1] == "4"
    assert "dali-plain" in printed and (out / "bench.txt").read_text().count("dali-plain") == 2
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = (out / "bench.json").read_bytes()
    assert cli.main(argv) == 2                                    # refused, before measuring
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "bench.json").read_bytes() == before


@pytest.mark.parametrize("argv, flag", [
    (["--contenders", "dali-ipmix,fastest"], "--contenders"),
    (["--data", "/nonexistent/images"], "--data"),
    (["--mixing", "/nonexistent/pictures"], "--mixing"),
    (["--hw-decoder-load", "2"], "--hw-decoder-load"),
    (["--hw-decoder-load", "nan"], "--hw-decoder-load"),
    (["--gen-size", "2"], "--gen-size"),
])
def test_bad_input_is_one_line_naming_the_flag(argv, flag, capsys):
    assert cli.main(["bench", "--device", "cpu", "--image-size", "32"] + argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and flag in errors[0]


@pytest.mark.parametrize("kw, flag", [
    (dict(backend="none"), "--backend"), (dict(arch="resnet_9000"), "--arch"),
    (dict(threads=[0]), "--threads"), (dict(iters=0), "--iters"), (dict(amp="fp16"), "--amp"),
    (dict(repeats=0), "--repeats"), (dict(min_seconds=float("nan")), "--min-seconds"),
    (dict(min_seconds=-1), "--min-seconds"),
])
def test_run_bench_rejects_bad_settings_before_measuring(kw, flag):
    with pytest.raises(UserError, match=flag):
        run_bench(**{**TINY, **kw}, log=lambda msg: None)


def test_reference_dataset_gives_the_official_views(tmp_path):
    cfg = training_config(32)
    data = bench_data(tmp_path, images=4, pictures=2, size=40, classes=2)
    ds = ReferenceDataset(data, cfg, resize=37)
    views, label = ds[3]          # sorted by class: class000/{0,2}, class001/{1,3}
    assert views.shape == (3, 3, 32, 32) and views.dtype == torch.float32 and label == 1
    # view 0 is the clean crop: normalised uint8 values, i.e. on the 1/255 grid before normalising
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    pixels = (views[0] * std + mean) * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)
    one = ReferenceDataset(data, cfg.replace(jsd=False), resize=37)[0][0]
    assert one.shape == (1, 3, 32, 32)


def test_read_row_reads_the_training_files_and_their_labels(tmp_path):
    """dali-read times the training data's own reader: every batch holds files of --data, byte for
    byte, with their class labels (not the mixing set's pictures, not decoded images)."""
    data = bench_data(tmp_path, images=6, pictures=3, size=40, classes=3)
    setup = K.Setup(data=data, cfg=training_config(32), batch_size=4, warmup=1, iters=2,
                    device="cpu", backend="fused", hw_decoder_load=0.0, arch="resnet18",
                    amp="off", channels_last=False, seed=0)
    files, labels = data.train_files()
    by_bytes = {(data.train_dir / f).read_bytes(): label for f, label in zip(files, labels)}
    pipe = K.read_pipeline(setup, threads=1)
    seen = set()
    for _ in range(3):
        encoded, got = pipe.run()
        for i in range(len(encoded)):
            payload = bytes(np.array(encoded[i]))
            assert by_bytes.get(payload) == int(np.array(got[i])[0])
            seen.add(payload)
    assert seen == set(by_bytes)                  # 12 reads of a shuffled 6-file epoch


def test_peak_memory_counts_worker_processes():
    code = "import numpy, time; a = numpy.ones(200 * 2**20 // 8); time.sleep(1.0)"
    with PeakMemory() as mem:
        subprocess.run([sys.executable, "-c", code], check=True)
    r = mem.result()
    assert r["host_rss_peak_mb"] - r["host_rss_start_mb"] > 150


@pytest.mark.slow
def test_dataloader_rows_time_whole_rounds_of_their_workers():
    # Batch i comes from worker i % workers; a window that is not whole rounds ends inside a burst
    # made before the clock started (16 workers, 10 batches: up to 4x too fast).
    assert [K.whole_rounds(10, w) for w in (1, 2, 3, 16)] == [10, 10, 12, 16]
    got = run_bench(**{**TINY, "iters": 3, "workers": [2]}, contenders=["reference"],
                    log=lambda m: None)["rows"][0]
    assert got["iters"] == 4 and got["error"] is None
    assert got["images_per_s"] == pytest.approx(got["batch_size"] * 4 / got["seconds"])


def test_cpu_time_counts_worker_processes():
    # a child that burns 0.4 s of CPU, says so, then idles: its CPU time is counted while it lives
    code = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"
            "print('done', flush=True)\ntime.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        before = K.cpu_seconds()
        assert child.stdout.readline().strip() == "done"
        after = K.cpu_seconds()
    finally:
        child.kill()
        child.wait()
    assert child.pid in after and after[child.pid] - before.get(child.pid, 0.0) > 0.3


def test_generated_sources_are_photo_sized_jpegs(tmp_path):
    data = bench_data(tmp_path, images=6, pictures=3, size=48, classes=3)
    from PIL import Image
    sources = sorted(Path(data.train_dir).rglob("*.jpg"))
    assert len(sources) == 6 and data.classes == 3 and data.generated_images
    with Image.open(sources[0]) as im:
        assert im.format == "JPEG" and im.size == (64, 48)
        assert np.asarray(im).std() > 5                           # not a flat fill
    with Image.open(next(Path(data.mixing_dir).glob("*.jpg"))) as im:
        assert im.size == (48, 48)


def test_a_failing_row_is_reported_and_the_others_still_run(monkeypatch, capsys):
    from dali_ipmix.bench import runner

    def boom(setup, threads):
        raise RuntimeError("no such decoder\nsecond line")

    plain = next(r for r in runner.ROWS if r.name == "dali-plain")
    monkeypatch.setattr(runner, "ROWS", tuple(dataclasses.replace(r, measure=boom) if r is plain
                                              else r for r in runner.ROWS))
    argv = ["bench", "--contenders", "dali-plain,synthetic", "--image-size", "32", "-b", "2",
            "--iters", "1", "--warmup", "0", "--threads", "1", "--device", "cpu", "--arch",
            "resnet18", "--gen-images", "4", "--gen-pictures", "2", "--gen-size", "32"]
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "error: dali-plain (threads 1): RuntimeError: no such decoder" in out
    assert "second line" not in out
    synthetic = next(line for line in out.splitlines() if line.startswith("synthetic"))
    assert float(synthetic.split()[3]) > 0


@pytest.fixture()
def data_with_a_bad_file(tmp_path):
    """Generated sources and pictures, one source replaced by bytes no decoder reads."""
    data = bench_data(tmp_path, images=8, pictures=2, size=40, classes=2)
    bad = sorted((data.train_dir / "class001").iterdir())[0]
    bad.write_bytes(b"this is not a picture" * 50)
    return data, bad


@pytest.mark.parametrize("contender", ["dali-plain", "reference"])
def test_a_bad_file_stops_the_run_with_one_line_naming_it(data_with_a_bad_file, contender, capsys):
    data, bad = data_with_a_bad_file
    argv = ["bench", "--contenders", contender, "--image-size", "32", "-b", "8", "--iters", "2",
            "--warmup", "0", "--threads", "1", "--device", "cpu", "--data", str(data.train_dir),
            "--mixing", str(data.mixing_dir)]
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and str(bad) in err[0], err
    assert "--data-filelist" in err[0] and "dali-ipmix verify" in err[0]


@pytest.mark.slow
def test_the_verified_file_list_skips_the_bad_file(data_with_a_bad_file, tmp_path, capsys):
    data, bad = data_with_a_bad_file
    good = tmp_path / "good.txt"
    assert cli.main(["verify", str(data.train_dir), "--write-filelist", str(good), "--jobs", "1"]) != 0
    capsys.readouterr()
    result = run_bench(**{**TINY, "batch_size": 8},
                       contenders=["dali-plain", "reference"], data=data.train_dir,
                       mixing=data.mixing_dir, data_filelist=good, log=lambda msg: None)
    assert result["data"]["images"] == 7 and result["data"]["train_filelist"] == str(good)
    assert all(r["error"] is None and r["images_per_s"] > 0 for r in result["rows"])


# ---------------------------------------------------------------------------------------------
# The official code as a contender (read from its checkout, never copied in).

def test_bad_official_checkout_is_one_line(tmp_path):
    (tmp_path / "imagenet.py").write_text("print('not the official code')\n")
    (tmp_path / "IPMix_utils.py").write_text("")
    for bad, msg in ((tmp_path / "missing", "not a checkout"), (tmp_path, "defines no ipmix")):
        with pytest.raises(UserError, match=msg) as e:
            run_bench(**{**TINY, "image_size": 224}, official=bad, log=lambda m: None)
        assert "--official" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif("not __import__('os').path.isdir(OFFICIAL)", reason="no official checkout")
def test_official_rows_need_224_px():
    with pytest.raises(UserError, match="--image-size 224"):
        run_bench(**TINY, official=OFFICIAL, log=lambda m: None)


@pytest.mark.slow
@pytest.mark.skipif("not __import__('os').path.isdir(OFFICIAL)", reason="no official checkout")
def test_official_and_reference_views_agree_in_statistics(tmp_path):
    # The same files through the official IPMixDataset and the reference row's dataset: views of
    # the same shape and dtype, and augmentation of the same strength -- the distribution of the
    # mean absolute change of an IPMix view from its clean view.  That change is heavy-tailed
    # (blend weight m ~ U(0,1), identity chains, the uint8 wrap of add/multiply): over a few
    # hundred views its mean has a standard error near 8 %, so "means within 10 %" would pass
    # only ~60 % of pairs of identical samplers.  Instead, over 800 views a side: a two-sample
    # Kolmogorov-Smirnov test at p > 0.001 and the means within 4 standard errors.  Simulated on
    # 18,000 views a side (docs/benchmarking.md), this accepts identical samplers >= 99.8 % of
    # the time and rejects a reference with twice the chain depth or chains, without P-level
    # mixing, without image ops, or without the blend with the clean view >= 98 % of the time.
    from scipy import stats
    from dali_ipmix.bench import official as O
    files = bench_data(tmp_path, images=24, pictures=6, size=256, classes=2, seed=1)
    code = O.load(OFFICIAL)
    official = O.dataset(code, files.train_dir, files.mixing_dir, jsd=True)
    reference = ReferenceDataset(files, training_config(224), resize=256)
    random.seed(1)                 # the official code draws from random, np.random and torch
    np.random.seed(1)
    torch.manual_seed(1)
    reference._rng = np.random.default_rng(1)

    def strength(ds, views, samples=400):
        changes = []
        for i in range(samples):
            got = views(ds[i % len(ds)][0])
            assert got.shape == (3, 3, 224, 224) and got.dtype == torch.float32
            changes += [float((got[v] - got[0]).abs().mean()) for v in (1, 2)]
        return np.array(changes)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # as in a DataLoader worker: the official code's many tiny torch
    try:                           # ops run ~8x slower with 2 threads on a busy 2-core machine
        off = strength(official, lambda im: O.as_views([t.unsqueeze(0) for t in im], True)[0])
        ref = strength(reference, lambda im: im)
    finally:
        torch.set_num_threads(threads)
    assert stats.ks_2samp(off, ref).pvalue > 1e-3, (np.median(off), np.median(ref))
    se = np.sqrt(off.var(ddof=1) / len(off) + ref.var(ddof=1) / len(ref))
    assert abs(off.mean() - ref.mean()) < 4 * se, (off.mean(), ref.mean(), se)


BENCH_TINY = ["bench", "--contenders", "dali-plain", "--image-size", "32", "-b", "4", "--iters", "1",
              "--warmup", "1", "--threads", "1", "--device", "cpu", "--gen-images", "8",
              "--gen-pictures", "4", "--gen-size", "40"]


def test_out_that_cannot_be_written_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    from dali_ipmix.bench import runner
    (tmp_path / "afile").write_text("x")
    ran = []
    monkeypatch.setattr(runner, "run_bench", lambda **kw: ran.append(1))
    assert cli.main(BENCH_TINY + ["--out", str(tmp_path / "afile" / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "afile" in err and not ran


def test_outputs_on_a_full_disk_warn_and_leave_no_partial_file(tmp_path, capsys, monkeypatch):
    from conftest import FullDisk
    from dali_ipmix import outputs
    disk = FullDisk()
    disk.fill(True)
    monkeypatch.setattr(outputs, "os", disk)
    out = tmp_path / "run"
    assert cli.main(BENCH_TINY + ["--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "dali-plain" in captured.out                           # the measurements are shown
    for name in ("bench.json", "bench.txt", "bench.png"):
        assert f"could not write {out / name} (No space left on device)" in captured.err
    assert sorted(p.name for p in out.iterdir()) == []            # no half file, no temp file


# ---------------------------------------------------------------------------------------------
# Sound timing: repetitions, medians, ratios within a repetition, long windows, a clean clock.

def test_ratios_are_taken_within_each_repetition_then_summarised():
    # the baseline moves between repetitions: the ratio's median is the median of each
    # repetition's own ratio (2.0, 4.0, 1.5 -> 2.0), not the median rate over the median
    # baseline (45 / 15 = 3.0)
    reps = [[dict(name="reference", views=1, threads=2, images_per_s=base),
             dict(name="dali-ipmix", views=1, threads=2, images_per_s=rate)]
            for base, rate in ((10.0, 20.0), (15.0, 60.0), (30.0, 45.0))]
    measured = []
    for k, rep in enumerate(reps):
        measured += [{**m, "repetition": k} for m in report.add_ratios(rep)]
    rows = {r["name"]: r for r in report.summarise(measured)}
    ipmix = rows["dali-ipmix"]
    assert ipmix["repetitions"] == 3
    assert ipmix["images_per_s"] == 45.0
    assert (ipmix["images_per_s_min"], ipmix["images_per_s_max"]) == (20.0, 60.0)
    assert ipmix["vs_baseline"] == 2.0                     # per repetition: 2.0, 4.0, 1.5
    assert (ipmix["vs_baseline_min"], ipmix["vs_baseline_max"]) == (1.5, 4.0)
    assert ipmix["images_per_s"] / rows["reference"]["images_per_s"] == 3.0   # what it is not
    assert "repetition" not in ipmix
    text = report.table(list(rows.values()))
    assert "20.0-60.0" in text and "1.50-4.00" in text and "median of 3 repetition(s)" in text


def test_a_failed_repetition_is_reported_and_left_out_of_the_median():
    measured = [dict(name="kernel", views=1, threads=None, images_per_s=v, error=e, repetition=k)
                for k, (v, e) in enumerate(((10.0, None), (None, "boom"), (30.0, None)))]
    (row,) = report.summarise(measured)
    assert row["images_per_s"] == 20.0 and row["error"] == "boom" and row["repetitions"] == 3


@pytest.mark.slow
def test_repetitions_interleave_the_rows_and_the_record_keeps_every_one():
    got = run_bench(**{**TINY, "repeats": 2}, contenders=["dali-plain", "synthetic"],
                    log=lambda m: None)
    order = [(m["name"], m["repetition"]) for m in got["measurements"]]
    assert order == [("dali-plain", 0), ("synthetic", 0), ("dali-plain", 1), ("synthetic", 1)]
    for row in got["rows"]:
        rates = [m["images_per_s"] for m in got["measurements"] if m["name"] == row["name"]]
        assert row["repetitions"] == 2 and row["images_per_s"] == pytest.approx(sum(rates) / 2)
        assert (row["images_per_s_min"], row["images_per_s_max"]) == (min(rates), max(rates))
    for m in got["measurements"]:
        # each repetition's ratio against its own synthetic measurement
        synth = next(s for s in got["measurements"]
                     if s["name"] == "synthetic" and s["repetition"] == m["repetition"])
        assert m["vs_synthetic"] == pytest.approx(m["images_per_s"] / synth["images_per_s"])
        # the warm-up actually used: --warmup plus the prefetch queue drained
        assert m["warmup"] == TINY["warmup"] + K.DALI_PREFETCH
    s = got["settings"]
    assert s["repeats"] == 2 and s["min_seconds"] == 0.0 and s["iters"] == TINY["iters"]
    code = got["code"]                                     # the commit measured (a git checkout)
    assert code["version"] and (code["commit"] is None or len(code["commit"]) == 40)
    assert json.loads(json.dumps(got)) == got


def test_a_row_times_at_least_min_seconds(monkeypatch):
    got = run_bench(**{**TINY, "min_seconds": 0.5}, contenders=["kernel"],
                    log=lambda m: None)["measurements"][0]
    assert got["seconds"] >= 0.5 and got["iters"] >= TINY["iters"]
    assert got["images_per_s"] == pytest.approx(got["batch_size"] * got["iters"] / got["seconds"])


def test_nothing_runs_between_the_device_sync_and_the_clock(monkeypatch):
    events = []
    clock = iter(range(1000))
    monkeypatch.setattr(K, "cpu_seconds", lambda: events.append("cpu") or {1: 0.0})
    monkeypatch.setattr(K.time, "perf_counter", lambda: events.append("clock") or next(clock))

    class Setup:
        warmup, iters, min_seconds = 1, 2, 0.0

        def sync(self):
            events.append("sync")
    K.timed(Setup(), 0.0, lambda: None, lambda b: events.append("batch"))
    timed = events[events.index("cpu"):]
    assert timed[:3] == ["cpu", "sync", "clock"]                 # start: CPU time read, sync, clock
    assert timed[-3:] == ["sync", "clock", "cpu"]                # end: sync, clock, CPU time read
    assert timed.count("batch") == 2


def test_cpu_figures_never_exceed_the_cores_and_need_a_long_enough_window():
    from dali_ipmix.bench.runner import cpu_figures
    # 2.5 ms of one process read 3.96 cores on a 2-core machine: too short to report
    assert cpu_figures(0.0099, 0.0025, 4, processes=1, cores=2) == (None, None)
    # 3 processes need 2 * 3 ticks / 0.1 core = 0.6 s
    assert cpu_figures(1.0, 0.5, 100, processes=3, cores=2) == (None, None)
    cores, ms = cpu_figures(1.3, 1.0, 100, processes=3, cores=2)
    assert cores == pytest.approx(1.3) and ms == pytest.approx(13.0)
    assert cpu_figures(2.1, 1.0, 100, processes=1, cores=2)[0] == 2   # counter jitter: at most all cores


@pytest.mark.slow
def test_rows_compare_at_the_same_thread_count_on_the_cpu():
    from dali_ipmix.bench.runner import ROWS, thread_counts
    rows = {r.name: r for r in ROWS}
    assert list(thread_counts(rows["synthetic"], [1, 2], [4], "cpu")) == [1, 2]
    assert list(thread_counts(rows["kernel"], [1, 2], [4], "cpu")) == [1, 2]
    assert list(thread_counts(rows["kernel"], [8, 16], [16], "gpu")) == [8]     # once on GPU
    assert list(thread_counts(rows["reference"], [1, 2], [4], "cpu")) == [4]
    got = run_bench(**{**TINY, "threads": [1, 2]}, contenders=["train", "synthetic"],
                    log=lambda m: None)["rows"]
    by = {(r["name"], r["threads"]): r for r in got}
    assert set(by) == {("train", 1), ("train", 2), ("synthetic", 1), ("synthetic", 2)}
    for n in (1, 2):
        assert by["train", n]["vs_synthetic"] == pytest.approx(
            by["train", n]["images_per_s"] / by["synthetic", n]["images_per_s"])


def test_the_code_measured_is_recorded_with_or_without_git(monkeypatch):
    import dali_ipmix
    here = report.code_version()
    assert here["version"] == dali_ipmix.__version__
    # this checkout is a git work tree: the commit is the one git names
    head = subprocess.run(["git", "-C", here["source"], "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode == 0:
        assert here["commit"] == head.stdout.strip() and here["dirty"] in (True, False)

    def no_git(*a, **kw):
        raise FileNotFoundError("git")
    monkeypatch.setattr(report.subprocess, "run", no_git)
    monkeypatch.delenv("DALI_IPMIX_COMMIT", raising=False)
    assert report.code_version()["commit"] is None           # the version alone says what ran
    monkeypatch.setenv("DALI_IPMIX_COMMIT", "abc123")         # a tree carried without its .git
    assert report.code_version()["commit"] == "abc123"
