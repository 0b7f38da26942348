"""The debugging commands: graph (DOT/SVG and summary), preview (contact sheet + draws JSON),
stages (every chain step exposed) and doctor, on the CPU with a tiny generated data set."""
import json
import os
import re
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from dali_ipmix import cli, config as C, reference as R
import pipelines
from dali_ipmix.debug import _common, doctor, graph, preview, stages
from dali_ipmix.debug._tiny_data import make_tiny_data
from dali_ipmix.sheet import tile_image, to_display

TINY = dict(image_size=32, k=1, t=1)
HAS_DOT = shutil.which("dot") is not None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("tiny") / "data")


def _pipe(data, cfg, backend, **kw):
    return _common.train_pipeline(*data, cfg, "imagenet", batch_size=2, device="cpu", backend=backend,
                                  seed=0, **kw)


def _svg_node_count(path):
    ns = "{http://www.w3.org/2000/svg}"
    return sum(1 for g in ET.parse(path).iter(ns + "g") if g.get("class") == "node")


# ---------------------------------------------------------------------------------------------
# graph

def test_graph_command_dot_has_one_node_per_pipeline_operator(data, tmp_path):
    out = tmp_path / "g"
    args = ["graph", "--data", str(data[0]), "--mixing", str(data[1]), "--image-size", "32",
            "--k", "1", "--t", "1", "--out", str(out)]
    assert cli.main(args) == 0
    # an independent build of the same pipeline
    pipe = _pipe(data, _common.make_config("imagenet", **TINY), "fused")
    pipe.build()
    names = graph.dot_node_names((out / "pipeline.dot").read_text())
    assert len(names) == len(set(names)) == len(pipe._ops)
    # DALI's own graph of what it executes: the same operators, minus the duplicates it merged,
    # plus MakeContiguous copies for the outputs
    executed = graph.executed_ops(pipe)
    assert {n for n in executed if "MakeContiguous" not in n} <= set(names)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["operators"] == len(names)
    assert summary["executed"]["merged_duplicates"] == len(set(names) - executed)
    # every edge joins declared nodes; the outputs are the pipeline's
    edges = re.findall(r'^\s*"([^"]+)" -> "([^"]+)"', (out / "pipeline.dot").read_text(), re.M)
    assert edges and {n for e in edges for n in e} <= set(names)
    assert summary["outputs"] == [node.source.name for node in pipe._graph_outputs]
    assert cli.main(args) == 2                  # an earlier run's files are not replaced silently
    if not HAS_DOT:
        pytest.skip("Graphviz `dot` is not installed (apt-get install graphviz): SVG not checked")
    assert _svg_node_count(out / "pipeline.svg") == len(names)


@pytest.mark.slow
def test_graph_collapse_folds_split_merge_per_if(data, tmp_path):
    cfg = _common.make_config("imagenet", **TINY)
    pipe = _pipe(data, cfg, "dali")
    summary = graph.write_graph(pipe, tmp_path, "tiny", collapse=True, max_render_nodes=100, log=lambda *a: None)
    nodes = graph.op_nodes(pipe)
    splits = [n for n in nodes if n.type == graph.SPLIT]
    merges = [n for n in nodes if n.type == graph.MERGE]
    assert summary["conditional_split"] == len(splits) > 0 and summary["conditional_merge"] == len(merges) > 0
    ifs = {n.inputs[-1][0] for n in splits}                 # one predicate per `if`
    assert {n.inputs[-1][0] for n in merges} <= ifs
    collapsed = (tmp_path / "pipeline_collapsed.dot").read_text()
    declared = graph.dot_node_names(collapsed)
    assert len(declared) == summary["collapsed_nodes"] == len(nodes) - len(splits) - len(merges) + len(ifs) + len(
        {n.inputs[-1][0] for n in merges})
    assert not any(n.name in declared for n in splits + merges)
    # the overview: every operator counted once, and a group for each image op of the table
    overview = (tmp_path / "pipeline_functions.dot").read_text()
    counts = [int(c) for c in re.findall(r"\\n(\d+) operators?", overview)]
    assert sum(counts) == len(nodes) and len(counts) == summary["function_groups"]
    for op in cfg.ops:
        assert f"select > {op}" in overview, op
    # the longest path is a real path: each operator feeds the next
    path = summary["longest_path"]["names"]
    inputs = {n.name: {s for s, _ in n.inputs} for n in nodes}
    assert all(a in inputs[b] for a, b in zip(path, path[1:])) and len(path) > 10
    # big graphs are not handed to dot; small ones are
    assert summary["files"]["svg"] is None
    if HAS_DOT:
        assert _svg_node_count(tmp_path / "pipeline_functions.svg") == summary["function_groups"]


def test_without_dot_one_line_says_how_to_render(tmp_path, monkeypatch):
    dot = tmp_path / "pipeline.dot"
    dot.write_text('digraph g { "a" [label="a"]; }\n')
    (tmp_path / "pipeline.svg").write_text("stale picture of an earlier run")
    monkeypatch.setattr(graph.shutil, "which", lambda name: None)
    image, note = graph.render(dot, "svg", 10, 100, 1)
    assert image is None and "\n" not in note and "apt-get install graphviz" in note
    assert f"dot -Tsvg {dot}" in note and not (tmp_path / "pipeline.svg").exists()


def test_gpu_graph_is_drawn_without_a_gpu(data, tmp_path):
    # the Python side of the GPU graph: mixed decoders, GPU pixel work, nothing executed here
    cfg = _common.make_config("imagenet", **TINY)
    pipe = _common.train_pipeline(*data, cfg, "imagenet", batch_size=2, device="gpu", backend="fused", seed=0)
    summary = graph.write_graph(pipe, tmp_path, "gpu", build=False, max_render_nodes=1, log=lambda *a: None)
    devices = {(r["type"], r["device"]) for r in summary["by_type_device"]}
    assert ("decoders.ImageRandomCrop", "mixed") in devices and ("BatchPythonFunction", "gpu") in devices
    assert "executed" not in summary
    assert len(graph.dot_node_names((tmp_path / "pipeline.dot").read_text())) == summary["operators"]


def test_graph_stats_reports_memory(data, tmp_path, capsys):
    assert cli.main(["graph", "--data", str(data[0]), "--mixing", str(data[1]), "--image-size", "32", "--k", "1",
                     "--t", "1", "--out", str(tmp_path), "--stats", "--iters", "1", "--max-render-nodes", "1"]) == 0
    report = (tmp_path / "memory.txt").read_text()
    assert "decoders.ImageRandomCrop" in report and "s/batch" in report
    assert "no SVG" in capsys.readouterr().out     # one line says why there is no picture


# ---------------------------------------------------------------------------------------------
# preview

def test_preview_sheet_and_draws_replay(data, tmp_path):
    cfg = _common.make_config("imagenet", image_size=32, k=2, t=2)
    out = tmp_path / "sheet.png"
    batch, _ = preview.preview(*data, out, cfg=cfg, n=3, seed=5, tile=40)
    record = json.loads(out.with_suffix(".json").read_text())
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert (sheet.shape[1], sheet.shape[0]) == tuple(record["sheet_size"])
    assert len(record["samples"]) == 3 and all(len(s["views"]) == 2 for s in record["samples"])
    for b, sample in enumerate(record["samples"]):
        crop, pic = batch.crops[b], batch.pictures[b]
        for a, view in enumerate(sample["views"]):
            # the sheet shows what it says: crop, picture and the pipeline's final view
            tiles = view["sheet_tiles"]
            final = to_display(batch.views[b][a + 1], cfg)
            for column, image in (("crop", crop), ("picture", pic), ("final", final)):
                x0, y0, x1, y1 = tiles[column]
                np.testing.assert_array_equal(sheet[y0:y1, x0:x1], np.asarray(tile_image(image, 40)))
            # the JSON holds the raw tape, and the readable draws alone rebuild it
            raw = np.asarray(view["tape"], np.float32)
            np.testing.assert_array_equal(raw, batch.tapes[b][a])
            rebuilt = preview.tape_from_draws(view["draws"], cfg)
            replay = R.ipmix_view(crop, pic, rebuilt, cfg)
            np.testing.assert_array_equal(replay, R.ipmix_view(crop, pic, raw, cfg))
            assert np.abs(replay - batch.views[b][a + 1]).mean() < 0.02
            depths = [c["depth"] for c in view["draws"]["chains"]]
            assert [len(c["steps"]) for c in view["draws"]["chains"]] == depths


def test_preview_same_seed_same_sheet(data, tmp_path):
    def run(name, seed, *extra):
        args = ["preview", "--data", str(data[0]), "--mixing", str(data[1]), "--image-size", "32", "--k", "2",
                "--t", "2", "--n", "2", "--tile", "32", "--seed", str(seed), "--out", str(tmp_path / name), *extra]
        return cli.main(args)

    assert run("a.png", 7) == 0 and run("b.png", 7) == 0 and run("c.png", 8) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    tapes = lambda n: [v["tape"] for s in json.loads((tmp_path / n).read_text())["samples"] for v in s["views"]]  # noqa: E731
    assert tapes("a.json") != tapes("c.json")
    assert run("a.png", 7) == 2                 # no silent overwrite
    assert run("a.jpg", 7) == 2                 # the sheet is a PNG


def test_readable_draws_round_trip_numpy_tapes(photos64, partners64):
    # tapes drawn by the NumPy sampler, every kind of step: rebuilt tapes replay identically
    from dali_ipmix import tape as T
    cfg = C.IMAGENET.replace(image_size=64, patch_sizes=(4, 8, 16, 32, 64), t=4, all_ops=True)
    tapes = T.sample(np.random.default_rng(3), cfg, 6)
    for x, f, tp in zip(photos64, partners64, tapes):
        draws = json.loads(json.dumps(preview.readable_draws(tp, cfg)))
        np.testing.assert_array_equal(R.ipmix_view(x, f, preview.tape_from_draws(draws, cfg), cfg), R.ipmix_view(x, f, tp, cfg))


# ---------------------------------------------------------------------------------------------
# stages

@pytest.mark.slow
def test_stages_expose_every_step_of_the_training_graph(data, tmp_path):
    cfg = _common.make_config("imagenet", image_size=32, k=1, t=2)
    index = stages.run_stages(*data, tmp_path, cfg, "imagenet", n=2, seed=3)
    # exposing the steps does not change the graph: same views as the training pipeline
    plain = _common.train_pipeline(*data, cfg, "imagenet", batch_size=2, device="cpu", backend="dali", seed=3)
    plain.build()
    views = pipelines.samples(plain.run()[0])
    assert json.loads((tmp_path / "index.json").read_text()) == index
    for b, sample in enumerate(index["samples"]):
        crop = np.asarray(Image.open(tmp_path / sample["crop"]))
        for a, view in enumerate(sample["views"]):
            final = np.asarray(Image.open(tmp_path / view["final"]))
            np.testing.assert_array_equal(final, to_display(views[b][a + 1], cfg))
            for chain in view["chains"]:
                prev = crop
                for st in chain["steps"]:
                    img = np.asarray(Image.open(tmp_path / st["file"]))
                    if st["what"].startswith("identity"):
                        np.testing.assert_array_equal(img, prev)
                    # rotate/shear differ from PIL by at most one level; equalize is DALI's own
                    if "equalize" not in st["what"]:
                        assert not st["flagged"] and st["reference"]["max_abs"] <= stages.FLAG_LEVELS, st
                    assert st["changed"] == pytest.approx(float((img != prev).mean()))
                    prev = img
                assert chain["result"] == chain["steps"][-1]["file"]


# ---------------------------------------------------------------------------------------------
# doctor and errors

def test_doctor_checks_pass_and_failures_are_reported(data, tmp_path, capsys):
    assert cli.main(["doctor", "--backends", "fused"]) == 0
    text = capsys.readouterr().out
    for what in ("nvidia-dali", "torch", "torchvision", "CUDA driver", "GPUs", "CPU cores", "HW JPEG decode"):
        assert what in text
    assert re.search(r"^\s+ok\s+cpu\s+fused", text, re.M)
    (tmp_path / "empty").mkdir()
    ok, msg = doctor.smoke_test(data[0], tmp_path / "empty", "cpu", "fused")
    assert not ok and "--mixing" in msg and "\n" not in msg


@pytest.mark.parametrize("argv,message", [
    (["graph", "--data", "x"], "--data and --mixing go together"),
    (["graph", "--k", "0"], "--k must be"),
    (["graph", "--render-timeout", "nan"], "--render-timeout, --max-render-nodes"),
    (["preview", "--out", "sheet.jpg"], "give a .png"),
    (["preview", "--out", "missing/sheet.png"], "the folder missing does not exist"),   # not created
    (["stages", "--device", "gpu"], "--device gpu: no CUDA GPU"),
])
def test_bad_input_one_line_errors(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["preview", "eval", "bench"])
def test_ctrl_c_is_one_line_and_exit_130(command, data, tmp_path, capsys, monkeypatch):
    import importlib

    def interrupt(*a, **kw):
        raise KeyboardInterrupt
    out = tmp_path / "out.png"
    argv = {"preview": ["--data", str(data[0]), "--mixing", str(data[1]), "--out", str(out)],
            "eval": [str(tmp_path / "model.pth"), "--data", str(data[0]), "--json", str(tmp_path / "r.json")],
            "bench": ["--device", "cpu", "--out", str(tmp_path / "bench")]}[command]
    # the work each command starts with, interrupted
    module, name = {"preview": ("dali_ipmix.debug.preview", "run_batch"),
                    "eval": ("dali_ipmix.robustness.model", "load_checkpoint"),
                    "bench": ("dali_ipmix.bench.runner", "run_bench")}[command]
    monkeypatch.setattr(importlib.import_module(module), name, interrupt)
    assert cli.main([command, *argv]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"dali-ipmix {command}: interrupted (Ctrl-C); every file it wrote is whole, the one " \
                  f"it was writing is absent"
    assert not out.exists() and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("bad", ["truncated", "text"])
def test_preview_bad_image_is_one_line_naming_it(bad, data, tmp_path, capsys):
    train = tmp_path / "train"
    shutil.copytree(data[0], train)
    good = next(train.glob("*/*.jpg"))
    broken = good.parent / "broken.jpg"
    broken.write_bytes(good.read_bytes()[:400] if bad == "truncated" else b"not a picture\n")
    args = ["preview", "--data", str(train), "--mixing", str(data[1]), "--image-size", "32", "--k", "1",
            "--t", "1", "--n", "8", "--tile", "32", "--out", str(tmp_path / "sheet.png")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(broken) in err and "dali-ipmix verify" in err, err
    assert not (tmp_path / "sheet.png").exists()


def test_graph_stats_on_an_undecodable_picture_is_one_line_naming_it(data, tmp_path, capsys):
    train = tmp_path / "train"
    shutil.copytree(data[0], train)
    broken = next(train.glob("*/*.jpg")).parent / "broken.jpg"
    broken.write_bytes(b"not a picture\n")
    args = ["graph", "--data", str(train), "--mixing", str(data[1]), "--image-size", "32", "--k", "1",
            "--t", "1", "--batch-size", "8", "--iters", "2", "--stats", "--max-render-nodes", "1",
            "--out", str(tmp_path / "g")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(broken) in err and "dali-ipmix verify" in err, err
    assert not (tmp_path / "g" / "memory.txt").exists()


def test_preview_out_that_cannot_be_written_is_refused_before_the_run(data, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    ran = []
    monkeypatch.setattr(preview, "preview", lambda *a, **kw: ran.append(1))
    args = ["preview", "--data", str(data[0]), "--mixing", str(data[1]), "--out",
            str(tmp_path / "afile" / "sheet.png")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "afile" in err and not ran
