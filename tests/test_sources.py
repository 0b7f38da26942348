"""Data sources: tar shards (``dali-ipmix shard``, ``fn.readers.webdataset``), class folders and
shards on a real S3-compatible server (``moto_server`` on 127.0.0.1), listing once, and the
errors of each."""
import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import time

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def

import train
from dali_ipmix import config as C
from dali_ipmix import readers, s3, shard, sources, verify
from dali_ipmix.errors import UserError
from dali_ipmix.loader import DaliLoader
from pipelines import imagenet
from conftest import free_port, two_ranks
from test_train import _args, tiny_factory

CFG = C.IMAGENET.replace(k=2, t=2, image_size=32, patch_sizes=(4, 8, 16))


@pytest.fixture(scope="module")
def shards(dataset, tmp_path_factory):
    """dataset/train as 2 shards, dataset/val as 1, dataset/mixing as 1 (a mixing set)."""
    out = tmp_path_factory.mktemp("shards")
    shard.convert(dataset / "train", out / "train", count=2, jobs=1, log=lambda *a: None)
    shard.convert(dataset / "val", out / "val", count=1, jobs=1, log=lambda *a: None)
    shard.convert(dataset / "mixing", out / "mixing", mixing=True, count=1, jobs=1,
                  log=lambda *a: None)
    return out


def _samples(data, batch=12):
    """{(label, sha of the decoded 32-px picture)} of the whole validation graph over ``data``."""
    pipe = imagenet.val_pipeline(data, cfg=CFG, batch_size=batch, num_threads=1, device="cpu",
                                 resize=36)
    pipe.build()
    images, labels = pipe.run()
    return sorted((int(np.asarray(l)[0]), hashlib.sha1(np.asarray(i).tobytes()).hexdigest())
                  for i, l in zip(images, labels))


# ---------------------------------------------------------------------------------------------
# The converter and the shard reader

def test_shards_hold_the_folders_pictures_and_labels(dataset, shards):
    from wds2idx import IndexCreator          # DALI's own index tool, from its wheel
    manifest = json.loads((shards / "train" / "manifest.json").read_text())
    assert manifest["samples"] == 12 and manifest["classes"] == ["class0", "class1", "class2"]
    assert manifest["class_counts"] == [4, 4, 4] and [s["samples"] for s in manifest["shards"]] == [6, 6]
    for s in manifest["shards"]:
        tar = shards / "train" / s["tar"]
        assert hashlib.sha256(tar.read_bytes()).hexdigest() == s["sha256"]
        IndexCreator(str(tar), str(shards / "ref.idx"), verbose=False).create_index()
        assert (shards / "ref.idx").read_text() == (shards / "train" / s["index"]).read_text()
    # shuffled across classes: the first shard is not one class
    with tarfile.open(shards / "train" / "shard-000000.tar") as t:
        labels = [int(t.extractfile(m).read()) for m in t if m.name.endswith(".cls")]
    assert len(set(labels)) > 1
    src = sources.open_source(shards / "train")
    assert (src.format, src.size, src.classes) == ("webdataset", 12, ("class0", "class1", "class2"))
    assert _samples(shards / "train") == _samples(dataset / "train")


def test_cls_members_become_their_labels():
    texts = [b"0", b"7", b"417", b"1000", b"999999999", b"000123"]

    @pipeline_def(batch_size=len(texts), num_threads=1, device_id=None)
    def graph():
        cls = fn.external_source(source=lambda: [np.frombuffer(t, np.uint8) for t in texts])
        return sources.cls_label(cls)
    pipe = graph()
    pipe.build()
    labels = [np.asarray(x) for x in pipe.run()[0]]
    assert all(x.dtype == np.int32 and x.shape == (1,) for x in labels)
    assert [int(x[0]) for x in labels] == [int(t) for t in texts]


def test_two_ranks_over_shards_read_every_sample_once_per_epoch(shards):
    src = sources.open_source(shards / "train")
    seen = []
    for rank in range(2):
        @pipeline_def(batch_size=3, num_threads=1, device_id=None, seed=rank)
        def graph():
            data, label = src.reader(name="Reader", shard_id=rank, num_shards=2, shuffle=True)
            return fn.get_property(data, key="source_info"), label
        pipe = graph()
        pipe.build()
        assert pipe.reader_meta("Reader")["epoch_size_padded"] == 12
        names = []
        for _ in range(2):                     # 6 samples per rank: one epoch
            info, _ = pipe.run()
            names += [bytes(np.asarray(i)).decode() for i in info]
        seen.append(names)
    assert len(set(seen[0])) == 6 and len(set(seen[1])) == 6
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 12


@pytest.mark.slow
def test_two_gloo_ranks_over_shards_see_every_sample_once_per_epoch(shards, tmp_path):
    # each rank: the training pipeline's reader on shard RANK of WORLD_SIZE, one epoch through
    # DaliLoader; the samples' names are gathered over gloo
    script = ("import sys, json, numpy as np, torch.distributed as dist\n"
              "from nvidia.dali import fn, pipeline_def\n"
              "from dali_ipmix import sources\n"
              "from dali_ipmix.loader import DaliLoader\n"
              "dist.init_process_group('gloo')\n"
              "rank, world = dist.get_rank(), dist.get_world_size()\n"
              "src = sources.open_source(sys.argv[1])\n"
              "@pipeline_def(batch_size=2, num_threads=1, device_id=None, seed=rank)\n"
              "def graph():\n"
              "    data, label = src.reader(name='Reader', shard_id=rank, num_shards=world, shuffle=True)\n"
              "    return fn.pad(fn.get_property(data, key='source_info'), axes=[0], shape=[200]), label\n"
              "names = []\n"
              "for info, _ in DaliLoader(graph(), last_batch='partial', views_layout=None):\n"
              "    names += [bytes(row.tolist()).rstrip(b'\\0').decode() for row in info]\n"
              "every = [None] * world\n"
              "dist.all_gather_object(every, names)\n"
              "if rank == 0:\n"
              "    json.dump(every, open(sys.argv[2], 'w'))\n"
              "dist.destroy_process_group()\n")
    codes, outs = two_ranks(script, str(shards / "train"), str(tmp_path / "seen.json"))
    assert codes == [0, 0], outs
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert [len(s) for s in seen] == [6, 6]
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 12


def _batches(pipe, n):
    loader = DaliLoader(pipe, last_batch="drop")
    out = []
    for images, labels in loader:
        out.append((images.clone(), labels.clone()))
        if len(out) == n:
            return out, loader


def test_resume_mid_epoch_over_shards_gives_the_same_batches(shards):
    def build(checkpoint=None):
        return imagenet.train_pipeline(shards / "train", shards / "mixing", cfg=CFG, batch_size=2,
                                       num_threads=1, device="cpu", seed=3, resize=36,
                                       enable_checkpointing=True, checkpoint=checkpoint)
    whole, _ = _batches(build(), 4)
    first, loader = _batches(build(), 2)
    state = loader.checkpoint()
    rest, _ = _batches(build(state), 2)
    for (a, la), (b, lb) in zip(whole, first + rest):
        assert a.equal(b) and la.equal(lb)


def _stopped_on_second_call(real):
    """``real``, but Ctrl-C on its second call (an interrupted run)."""
    calls = []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    return interrupted


def test_converter_leaves_out_bad_pictures_and_never_half_writes(dataset, tmp_path, monkeypatch, capsys):
    data = tmp_path / "train"
    shutil.copytree(dataset / "train", data)
    (data / "class1" / "zz.jpg").write_bytes((data / "class1" / "001.jpg").read_bytes()[:500])
    out = tmp_path / "out"
    manifest = shard.convert(data, out, count=3, jobs=1)
    assert manifest["samples"] == 12 and manifest["left_out"][0]["path"] == "class1/zz.jpg"
    assert "class1/zz.jpg" in capsys.readouterr().out
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="not empty; pass --overwrite"):
        shard.convert(data, out, count=2, jobs=1)
    monkeypatch.setattr(shard, "write_shard", _stopped_on_second_call(shard.write_shard))
    with pytest.raises(KeyboardInterrupt):
        shard.convert(data, out, count=2, seed=1, jobs=1, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before     # the old set, untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_filelist_reads_only_the_listed_files_without_walking_the_folders(dataset, tmp_path, monkeypatch):
    listed = tmp_path / "good.txt"
    listed.write_text("class0/000.jpg 0\nclass2/002.jpg 2\n")

    def walk(*a, **kw):
        raise AssertionError("the class folders were walked")
    monkeypatch.setattr(readers, "_image_files", walk)
    src = sources.open_source(dataset / "train", filelist=listed)
    assert (src.files, src.labels, len(src.classes)) == (["class0/000.jpg", "class2/002.jpg"], [0, 2], 3)


def test_a_training_run_lists_its_data_once(dataset, shards, tmp_path, monkeypatch):
    calls = []
    for name in ("class_folder_files", "picture_files"):
        real = getattr(readers, name)
        monkeypatch.setattr(readers, name, lambda *a, _real=real, _name=name, **kw:
                            calls.append(_name) or _real(*a, **kw))
    manifests = []
    real_manifest = sources.read_manifest
    monkeypatch.setattr(sources, "read_manifest", lambda *a, **kw: manifests.append(a[0]) or
                        real_manifest(*a, **kw))
    argv = _args(dataset, tmp_path / "run", "--max-steps", "1", "--epochs", "1")
    argv[argv.index("--data-path"):argv.index("--data-path") + 2] = [
        "--train-dir", str(shards / "train"), "--val-dir", str(dataset / "val")]
    assert train.main(argv, model_factory=tiny_factory) == 0
    assert sorted(calls) == ["class_folder_files", "picture_files"]     # val folders, mixing set
    assert manifests == [str(shards / "train")]


# ---------------------------------------------------------------------------------------------
# Errors of a shard set

def _copy(shards, tmp_path, name="train"):
    return shutil.copytree(shards / name, tmp_path / name)


def test_a_shard_without_its_index_says_how_to_make_it(shards, tmp_path, capsys):
    from dali_ipmix.cli import main
    data = _copy(shards, tmp_path)
    (data / "shard-000001.idx").unlink()
    with pytest.raises(UserError, match=r"shard-000001.tar has no index file .*wds2idx"):
        sources.open_source(data)
    # verify fails the set that training refuses, with the same words
    assert main(["verify", str(data)]) == 1
    assert "FATAL DATA_DIR" in capsys.readouterr().out


def test_a_manifest_whose_counts_do_not_match_is_refused(shards, tmp_path):
    data = _copy(shards, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["shards"][0]["samples"] += 1
    manifest["samples"] += 1
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"shard-000000.idx: indexes 6 samples but manifest.json says 7"):
        sources.open_source(data)
    manifest["shards"][0]["samples"] -= 1
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="the shards hold 12 samples but the manifest says 13"):
        sources.open_source(data)


def test_a_corrupt_member_mid_run_names_shard_member_and_verify(shards, tmp_path, capsys):
    from dali_ipmix.cli import main
    data = _copy(shards, tmp_path)
    index = (data / "shard-000001.idx").read_text().splitlines()
    ext, offset, size, member = index[2].split()[:4]          # the second sample's picture
    with open(data / "shard-000001.tar", "r+b") as f:
        f.seek(int(offset))
        f.write(b"\x00garbage" * (int(size) // 8))
    src = sources.open_source(data)
    with pytest.raises(RuntimeError) as e:
        _samples(src)
    assert verify.explain_shard_error(e.value, [src], search_limit=0) is not None   # unnamed
    err = verify.explain_shard_error(e.value, [src], search_limit=1000)
    assert err is not None and f"{data}/shard-000001.tar, {member}: not_image" in str(err)
    assert f"dali-ipmix verify {data}" in str(err)
    assert main(["verify", str(data)]) == 1
    assert f"shard-000001.tar, {member}: not_image" in capsys.readouterr().out


def test_a_truncated_member_mid_run_is_named_by_dali(shards, tmp_path):
    data = _copy(shards, tmp_path)
    index = (data / "shard-000000.idx").read_text().splitlines()
    _, offset, size, member = index[1].split()[:4]           # the first sample's picture
    with open(data / "shard-000000.tar", "r+b") as f:        # the picture ends half-way
        f.seek(int(offset) + int(size) // 2)
        f.write(bytes(int(size) - int(size) // 2))
    src = sources.open_source(data)
    with pytest.raises(RuntimeError) as e:
        _samples(src)
    err = str(verify.explain_shard_error(e.value, [src]))
    assert f"{data}/shard-000000.tar, member {member}" in err and f"dali-ipmix verify {data}" in err


# ---------------------------------------------------------------------------------------------
# A real S3-compatible server on 127.0.0.1

@pytest.fixture(scope="module")
def s3_server(dataset, shards):
    """A moto server holding bucket ``data``: train/ val/ mixing/ class folders and
    shards/{train,val,mixing}."""
    pytest.importorskip("moto")
    with s3.loopback_server() as endpoint:
        s3.upload_tree(dataset, "s3://data", endpoint)
        s3.upload_tree(shards, "s3://data/shards", endpoint)
        yield endpoint


@pytest.fixture
def aws(s3_server, monkeypatch):
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    return s3_server


@pytest.mark.slow
def test_s3_folders_and_shards_read_like_the_local_folders(dataset, aws):
    folders = sources.open_source("s3://data/train")
    local = sources.open_source(dataset / "train")
    assert (folders.files, folders.labels, folders.classes) == (local.files, local.labels, local.classes)
    mixing = sources.open_source("s3://data/mixing", labelled=False)
    assert mixing.files == readers.picture_files(dataset / "mixing")
    shards = sources.open_source("s3://data/shards/train/")
    assert (shards.format, shards.size, shards.classes) == ("webdataset", 12, local.classes)
    pattern = sources.open_source("s3://data/shards/train/shard-{000001..000001}.tar")
    assert pattern.size == 6 and pattern.shards == ["s3://data/shards/train/shard-000001.tar"]
    expected = _samples(dataset / "train")
    assert _samples(folders) == expected and _samples(shards) == expected


def test_training_from_s3_lists_each_prefix_once(aws, tmp_path, monkeypatch, dataset, capsys):
    listed = []
    real = s3.list_prefix
    monkeypatch.setattr(s3, "list_prefix", lambda uri, *a: listed.append(uri) or real(uri, *a))
    argv = _args(dataset, tmp_path / "run", "--max-steps", "2", "--epochs", "1")
    argv[argv.index("--data-path"):argv.index("--data-path") + 2] = ["--data-path", "s3://data/shards"]
    argv[argv.index("--mixing-set") + 1] = "s3://data/mixing"
    assert train.main(argv, model_factory=tiny_factory) == 0
    assert sorted(listed) == ["s3://data/mixing", "s3://data/shards/train", "s3://data/shards/val"]
    # the run says once that DALI's S3 reads will not feed a GPU, and what to do
    assert capsys.readouterr().out.count("to feed a GPU, copy the data to local or shared disk") == 1


@pytest.mark.parametrize("case", ["no_bucket", "no_prefix", "no_credentials", "denied", "unreachable"])
def test_s3_errors_are_one_line_before_any_work(case, aws, monkeypatch, dataset, tmp_path, capsys):
    uri, expect = {
        "no_bucket": ("s3://nosuch/train", "bucket nosuch does not exist"),
        "no_prefix": ("s3://data/nosuch", "no objects under prefix nosuch/ in bucket data"),
        "no_credentials": ("s3://data/train", "no AWS credentials found"),
        "denied": ("s3://data/train", "access denied"),
        "unreachable": ("s3://data/train", "cannot reach http://127.0.0.1:"),
    }[case]
    if case == "no_credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    if case == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    out = tmp_path / "run"
    argv = _args(dataset, out, "--max-steps", "1")
    argv[argv.index("--data-path"):argv.index("--data-path") + 2] = [
        "--train-dir", uri, "--val-dir", str(dataset / "val")]
    with contextlib.ExitStack() as stack:
        if case == "denied":      # a server that checks keys (IAM): "test" is no user's key
            monkeypatch.setenv("AWS_ENDPOINT_URL",
                               stack.enter_context(s3.loopback_server(INITIAL_NO_AUTH_ACTION_COUNT="0")))
        start = time.monotonic()
        assert train.main(argv, model_factory=tiny_factory) == 2
        assert time.monotonic() - start < 60
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err and uri in err, err
    assert not out.exists()


@pytest.mark.slow
def test_preview_and_bench_take_shards_and_s3(shards, aws, tmp_path):
    from dali_ipmix.bench.runner import run_bench
    from dali_ipmix.cli import main
    assert main(["preview", "--data", "s3://data/shards/train", "--mixing", str(shards / "mixing"),
                 "--image-size", "32", "--k", "1", "--t", "1", "--n", "2", "--tile", "32",
                 "--out", str(tmp_path / "sheet.png")]) == 0
    assert json.loads((tmp_path / "sheet.json").read_text())["data"] == "s3://data/shards/train"
    record = run_bench(data=str(shards / "train"), mixing="s3://data/mixing", contenders=["dali-plain"],
                       threads=[1], batch_size=4, image_size=32, warmup=0, iters=2, device="cpu",
                       log=lambda m: None)
    assert record["data"]["train_format"] == "webdataset" and record["data"]["images"] == 12
    assert record["rows"][0]["error"] is None and record["rows"][0]["images_per_s"] > 0
    with pytest.raises(UserError, match="the PIL rows .* read local class folders"):
        run_bench(data=str(shards / "train"), mixing=str(shards / "mixing"), contenders=["reference"],
                  threads=[1], batch_size=4, image_size=32, warmup=0, iters=1, device="cpu",
                  log=lambda m: None)


def test_a_truncated_shard_is_refused_before_and_named_during_a_run(shards, tmp_path):
    data = _copy(shards, tmp_path)
    tar = data / "shard-000001.tar"
    os.truncate(tar, tar.stat().st_size - 10000)
    with pytest.raises(UserError, match=r"shard-000001.tar: \d+ bytes but manifest.json says \d+: truncated"):
        sources.open_source(data)
    manifest = json.loads((data / "manifest.json").read_text())    # a manifest without sizes:
    for s in manifest["shards"]:                                     # met when DALI reads it
        del s["bytes"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    src = sources.open_source(data)
    with pytest.raises(RuntimeError) as e:
        _samples(src)
    err = str(verify.explain_shard_error(e.value, [src]))
    assert f"{data}/shard-000001.idx, line" in err and "past the end of its shard" in err
    assert f"dali-ipmix verify {data}" in err


def test_shard_command_cuts_by_size_and_refuses_a_bad_size(dataset, tmp_path, capsys):
    from dali_ipmix.cli import main
    out = tmp_path / "out"
    assert main(["shard", str(dataset / "train"), str(out), "--shard-size", "20kB", "--jobs", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = [s["bytes"] for s in manifest["shards"]]
    assert len(sizes) > 2 and sum(s["samples"] for s in manifest["shards"]) == 12
    assert all(size <= 20 * 1024 + 10240 for size in sizes)    # tar's end blocks on top
    assert main(["shard", str(dataset / "train"), str(tmp_path / "o2"), "--shard-size", "big"]) == 2
    assert "--shard-size big" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_training_on_a_shard_set_with_a_corrupt_member_stops_with_one_line(dataset, shards, tmp_path, capsys):
    data = _copy(shards, tmp_path)
    _, offset, size, member = (data / "shard-000000.idx").read_text().splitlines()[3].split()[:4]
    with open(data / "shard-000000.tar", "r+b") as f:
        f.seek(int(offset))
        f.write(b"\x00garbage" * (int(size) // 8))
    argv = _args(dataset, tmp_path / "run", "--max-steps", "6")
    argv[argv.index("--data-path"):argv.index("--data-path") + 2] = [
        "--train-dir", str(data), "--val-dir", str(dataset / "val")]
    assert train.main(argv, model_factory=tiny_factory) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{data}/shard-000000.tar, {member}: not_image" in err and f"dali-ipmix verify {data}" in err


@pytest.mark.slow
def test_two_ranks_training_from_s3_list_the_bucket_once(aws, dataset, tmp_path):
    # rank 0 lists each prefix and sends the records; rank 1 lists nothing
    script = ("import os, sys, train, test_train\n"
              "from dali_ipmix import s3\n"
              "calls, real = [], s3.list_prefix\n"
              "s3.list_prefix = lambda uri, *a: calls.append(uri) or real(uri, *a)\n"
              "rc = train.main(sys.argv[1:], model_factory=test_train.tiny_factory)\n"
              "print('LISTED', os.environ['RANK'], sorted(calls))\n"
              "sys.exit(rc)\n")
    argv = _args(dataset, tmp_path / "run", "--max-steps", "1", "--epochs", "1", "--batch-size", "2")
    argv[argv.index("--data-path") + 1] = "s3://data/shards"
    argv[argv.index("--mixing-set") + 1] = "s3://data/shards/mixing"
    codes, outs = two_ranks(script, *argv, timeout=240)
    assert codes == [0, 0], outs
    assert ("LISTED 0 ['s3://data/shards/mixing', 's3://data/shards/train', 's3://data/shards/val']"
            in outs[0]), outs[0]
    assert "LISTED 1 []" in outs[1], outs[1]


def test_the_public_loaders_read_shards_and_s3(shards, aws):
    from dali_ipmix.ipmix_loader import IPMixLoader, IPMixValLoader
    train = IPMixLoader("s3://data/shards/train", shards / "mixing", cfg=CFG, batch_size=4,
                        num_threads=1, device="cpu")
    assert (train.epoch_size, train.num_classes) == (12, 3)
    images, labels = next(iter(train))
    assert images.shape == (4 * CFG.views, 3, 32, 32) and set(labels.tolist()) <= {0, 1, 2}
    val = IPMixValLoader(shards / "val", cfg=CFG, batch_size=6, num_threads=1, device="cpu")
    assert sorted(l for _, labels in val for l in labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4


# ---------------------------------------------------------------------------------------------
# dali-ipmix eval over shards and S3 (PIL reads each sample's bytes from the source)

@pytest.fixture(scope="module")
def eval_checkpoint(tmp_path_factory):
    import torch
    from dali_ipmix import models
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("eval") / "checkpoint_00000001.pth"
    torch.save({"model": models.get_model("tiny_cnn", 3).state_dict(), "arch": "tiny_cnn",
                "args": {"num_classes": 3, "image_size": 32, "preset": "imagenet"}}, path)
    return path


def _eval_items(data, flag="--data"):
    """sorted (label, sha of the crop) of eval's dataset over ``data``."""
    from dali_ipmix.robustness.datasets import ClassFolderImages
    ds = ClassFolderImages(data, resize=36, size=32, flag=flag)
    return sorted((y, hashlib.sha1(x.tobytes()).hexdigest()) for x, y in (ds[i] for i in range(len(ds))))


def _eval_clean(data, checkpoint, tmp_path, name, workers="0"):
    from dali_ipmix.cli import main
    out = tmp_path / f"{name}.json"
    assert main(["eval", str(checkpoint), "--data", str(data), "--no-corruptions", "--no-pgd", "-q",
                 "--workers", workers, "--batch-size", "5", "--json", str(out)]) == 0
    return json.loads(out.read_text())["clean"]


def _same_figures(a, b):
    assert a["images"] == b["images"] == 12
    for key in ("top1_err", "top5_err", "rms", "ece"):
        assert a[key] == pytest.approx(b[key], abs=1e-9), key


def test_eval_over_local_shards_equals_eval_over_their_folders(dataset, shards, eval_checkpoint, tmp_path):
    assert _eval_items(shards / "val") == _eval_items(dataset / "val")
    # --max-images spreads over the classes, as over folders (the shards are shuffled)
    from dali_ipmix.robustness.datasets import ClassFolderImages
    assert ClassFolderImages(shards / "val", resize=36, size=32, max_images=3).labels == [0, 1, 2]
    # the whole set, and a pattern of its shards
    folders = _eval_clean(dataset / "val", eval_checkpoint, tmp_path, "folders")
    _same_figures(_eval_clean(shards / "val", eval_checkpoint, tmp_path, "shards"), folders)
    _same_figures(_eval_clean(f"{shards}/val/shard-00000*.tar", eval_checkpoint, tmp_path, "pattern"),
                  folders)


def test_eval_over_s3_shards_and_folders_equals_eval_over_the_local_folders(dataset, aws, eval_checkpoint,
                                                                             tmp_path):
    assert _eval_items("s3://data/shards/val") == _eval_items(dataset / "val")
    folders = _eval_clean(dataset / "val", eval_checkpoint, tmp_path, "folders")
    # in a worker process: its own S3 client, not the parent's connections
    _same_figures(_eval_clean("s3://data/shards/val", eval_checkpoint, tmp_path, "s3-shards", workers="1"),
                  folders)
    _same_figures(_eval_clean("s3://data/val", eval_checkpoint, tmp_path, "s3-folders"), folders)


def test_eval_bad_locations_are_one_line_before_any_work(aws, shards, eval_checkpoint, tmp_path, capsys):
    from dali_ipmix.cli import main

    def one_line(data, flag="--data"):
        assert main(["eval", str(eval_checkpoint), flag, str(data), "--no-corruptions", "--no-pgd", "-q",
                     "--workers", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("dali-ipmix eval: error:")
        return err
    assert "bucket nosuch does not exist" in one_line("s3://nosuch/val")
    assert "no objects under prefix nothing/" in one_line("s3://data/nothing")
    assert "matches none of the 1 shards" in one_line(f"{shards}/val/shard-9*.tar")
    # a shard set of mixing pictures has no classes
    assert "a shard set of mixing pictures" in one_line(shards / "mixing")
    # a picture member that does not decode: the shard, the member and the verify command
    data = _copy(shards, tmp_path, "val")
    ext, offset, size, member = (data / "shard-000000.idx").read_text().splitlines()[3].split()[:4]
    with open(data / "shard-000000.tar", "r+b") as f:
        f.seek(int(offset))
        f.write(b"\x00garbage" * (int(size) // 8))
    err = one_line(data)
    assert f"{data}/shard-000000.tar:{member}: the evaluation stopped" in err
    assert "cannot be decoded" in err and f"dali-ipmix verify {data}" in err


# ---------------------------------------------------------------------------------------------
# dali-ipmix verify over S3: the same report and exit code as over the local copy

def _report_lines(out):
    """The report without its first line (the location, the workers, the time)."""
    return [line for line in out.splitlines()[1:] if not line.startswith("file list:")]


def test_verify_s3_shards_reports_like_the_local_copy(shards, aws, tmp_path, capsys):
    from dali_ipmix.cli import main
    assert main(["verify", "s3://data/shards/train"]) == 0
    assert "result: no fatal problems" in capsys.readouterr().out
    data = _copy(shards, tmp_path)
    _, offset, size, member = (data / "shard-000001.idx").read_text().splitlines()[2].split()[:4]
    with open(data / "shard-000001.tar", "r+b") as f:           # a member that does not decode
        f.seek(int(offset))
        f.write(b"\x00garbage" * (int(size) // 8))
    s3.upload_tree(data, "s3://data/bad-shards", aws)
    assert main(["verify", str(data), "--json", str(tmp_path / "local.json")]) == 1
    local = capsys.readouterr().out
    assert main(["verify", "s3://data/bad-shards/", "--json", str(tmp_path / "s3.json")]) == 1
    remote = capsys.readouterr().out
    assert f"shard-000001.tar, {member}: not_image" in remote and "upload it again" in remote
    assert _report_lines(remote)[:-1] == _report_lines(local)[:-1]
    assert (json.loads((tmp_path / "s3.json").read_text())["problems"]
            == json.loads((tmp_path / "local.json").read_text())["problems"] != [])
    # a shard missing from the bucket is a problem, not a traceback
    s3.upload_tree(shards / "val", "s3://data/half-shards", aws)
    client = s3._client()
    client.delete_object(Bucket="data", Key="half-shards/shard-000000.tar")
    assert main(["verify", "s3://data/half-shards"]) == 1
    assert "shard-000000.tar: truncated or corrupt tar (no object" in capsys.readouterr().out


@pytest.mark.slow
def test_verify_s3_class_folders_reports_like_the_local_copy(dataset, aws, tmp_path, monkeypatch, capsys):
    from dali_ipmix.cli import main
    data = tmp_path / "train"
    shutil.copytree(dataset / "train", data)
    (data / "class1" / "zz.jpg").write_bytes((data / "class1" / "001.jpg").read_bytes()[:500])
    (data / "class2" / "empty.png").write_bytes(b"")
    (data / "class0" / "notes.txt").write_text("not a picture")
    (data / "class0" / "empty.txt").write_bytes(b"")
    (data / "stray.jpg").write_bytes((data / "class0" / "000.jpg").read_bytes())
    s3.upload_tree(data, "s3://data/bad-train", aws)
    lists, listed = {}, []
    real = s3.list_prefix
    monkeypatch.setattr(s3, "list_prefix", lambda uri, *a: listed.append(uri) or real(uri, *a))
    for name, where in (("local", str(data)), ("s3", "s3://data/bad-train")):
        lists[name] = tmp_path / f"{name}.txt"
        assert main(["verify", where, "--jobs", "2", "--write-filelist", str(lists[name]),
                     "--json", str(tmp_path / f"{name}.json"), "--max-shown", "0"]) == 1
        out = capsys.readouterr().out
        lists[name + "-out"] = _report_lines(out.replace(where, "DATA"))
        assert out.splitlines()[0].startswith(f"verify {where} (class folders): 17 files, 14 listed")
    assert listed == ["s3://data/bad-train"]            # one listing: what it is, and the scan
    assert lists["s3-out"] == lists["local-out"]
    assert any("FATAL class1/zz.jpg  truncated" in line for line in lists["s3-out"])
    assert any("FATAL class2/empty.png  empty" in line for line in lists["s3-out"])
    assert any("stray.jpg  outside_classes" in line for line in lists["s3-out"])
    assert lists["s3"].read_text() == lists["local"].read_text()
    local, remote = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "s3"))
    assert dict(remote, root=None) == dict(local, root=None)
    # the file list holds keys relative to the prefix, which open_source takes for the bucket
    src = sources.open_source("s3://data/bad-train", filelist=lists["s3"])
    assert src.size == 12 and "class1/zz.jpg" not in src.files
    # mixing pictures under a prefix
    assert main(["verify", "s3://data/mixing", "--mixing"]) == 0
    assert "(mixing pictures): 5 files, 5 listed by the reader, 5 usable" in capsys.readouterr().out


def test_verify_bad_s3_locations_and_options_are_one_line(shards, aws, tmp_path, capsys):
    from dali_ipmix.cli import main

    def one_line(*argv):
        assert main(["verify", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err, err
        return err
    assert "bucket nosuch does not exist" in one_line("s3://nosuch/train")
    assert "no objects under prefix nothing/" in one_line("s3://data/nothing")
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next((shards.parent).rglob("*.json")), flat / "x.jpg")
    s3.upload_tree(flat, "s3://data/flat", aws)
    assert "no class prefixes with pictures" in one_line("s3://data/flat")
    for where in ("s3://data/shards/train", str(shards / "train")):
        assert "is a shard set, and a file list applies to class folders" in one_line(
            where, "--write-filelist", str(tmp_path / "x.txt"))
    assert not (tmp_path / "x.txt").exists()
    # --jobs over S3: at least 1, at most the client's connection pool (verify and shard alike)
    assert "--jobs must be >= 1" in one_line("s3://data/mixing", "--mixing", "--jobs", "0")
    assert f"at most {s3.MAX_CONNECTIONS} parallel requests" in one_line(
        "s3://data/shards/train", "--jobs", str(s3.MAX_CONNECTIONS + 1))
    assert main(["shard", "s3://data/mixing", str(tmp_path / "o"), "--mixing", "--jobs", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--jobs must be >= 1" in err and "\n" not in err and not (tmp_path / "o").exists()
    # tar shards without a manifest: the command that indexes them, not "no class folders"
    tars = tmp_path / "tars"
    tars.mkdir()
    shutil.copy(shards / "train" / "shard-000000.tar", tars / "a.tar")
    s3.upload_tree(tars, "s3://data/tars", aws)
    assert "index a local copy with `dali-ipmix shard --index DIR`" in one_line("s3://data/tars")
    assert f"dali-ipmix shard --index {tars}" in one_line(str(tars))


# ---------------------------------------------------------------------------------------------
# dali-ipmix eval --imagenet-c over S3 and over shard sets

@pytest.fixture(scope="module")
def imagenet_c(dataset, tmp_path_factory):
    """A tiny ImageNet-C copy (2 corruptions x 2 severities x 2 classes of 2 pictures) as class
    folders, and the same with a shard set per corruption/severity."""
    root = tmp_path_factory.mktemp("imagenet-c")
    pictures = sorted((dataset / "val").rglob("*.jpg"))
    for j, (name, sev) in enumerate((c, s) for c in ("gaussian_noise", "fog") for s in (1, 2)):
        for cls in ("class0", "class1"):
            folder = root / "folders" / name / str(sev) / cls
            folder.mkdir(parents=True)
            for pic in [p for p in pictures if p.parent.name == cls][j % 3:j % 3 + 2]:
                shutil.copy(pic, folder / pic.name)
        shard.convert(root / "folders" / name / str(sev), root / "shards" / name / str(sev), count=1,
                      jobs=1, log=lambda *a: None)
    return root


def _eval_c(dataset, checkpoint, where, tmp_path, name, *extra):
    from dali_ipmix.cli import main
    out = tmp_path / f"{name}.json"
    assert main(["eval", str(checkpoint), "--data", str(dataset / "val"), "--imagenet-c", str(where),
                 "--corruptions", "gaussian_noise,fog", "--severities", "1,2", "--no-pgd", "-q",
                 "--workers", "0", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())["corruptions"]


@pytest.mark.slow
def test_eval_imagenet_c_over_s3_and_shards_equals_the_local_folders(dataset, imagenet_c, aws, eval_checkpoint,
                                                                   tmp_path, monkeypatch):
    s3.upload_tree(imagenet_c / "folders", "s3://data/imagenet-c", aws)
    s3.upload_tree(imagenet_c / "shards", "s3://data/imagenet-c-shards", aws)
    expected = _eval_c(dataset, eval_checkpoint, imagenet_c / "folders", tmp_path, "local")
    per = expected["per_corruption"]
    assert sorted(per) == ["fog", "gaussian_noise"] and expected["source"] == "imagenet-c"
    assert [v["images"] for c in per.values() for v in c["by_severity"].values()] == [4] * 4
    listed = []
    real = s3.list_prefix
    monkeypatch.setattr(s3, "list_prefix", lambda uri, *a: listed.append(uri) or real(uri, *a))
    for name, where in (("s3", "s3://data/imagenet-c"), ("shards", imagenet_c / "shards"),
                        ("s3-shards", "s3://data/imagenet-c-shards/")):
        got = _eval_c(dataset, eval_checkpoint, where, tmp_path, name)
        assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True), name
    assert listed == ["s3://data/imagenet-c", "s3://data/imagenet-c-shards/"]    # once each


def test_eval_imagenet_c_on_s3_bad_layouts_are_one_line(dataset, imagenet_c, aws, eval_checkpoint, tmp_path,
                                                        capsys):
    from dali_ipmix.cli import main
    s3.upload_tree(imagenet_c / "folders", "s3://data/imagenet-c", aws)

    def one_line(where, *extra):
        assert main(["eval", str(eval_checkpoint), "--data", str(dataset / "val"), "--imagenet-c", where,
                     "--no-pgd", "-q", "--workers", "0", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err, err
        return err
    assert "no severity folder fog/3 (found 1, 2)" in one_line("s3://data/imagenet-c", "--corruptions", "fog")
    assert "no folder for gaussian_noise" in one_line("s3://data/imagenet-c/fog")
    assert "bucket nosuch does not exist" in one_line("s3://nosuch/imagenet-c")


# ---------------------------------------------------------------------------------------------
# dali-ipmix shard --index: WebDataset sets made by another tool

def _foreign_set(dataset, out, labelled=True, split=(7, 12)):
    """dataset/train as webdataset's ShardWriter writes it: PAX tars written as a stream,
    members of a sample in sorted extension order (.cls, .jpg, .json; the second shard in
    reverse, as another tool may), no index, no manifest; one key longer than a USTAR name (a
    PAX header)."""
    import io
    out.mkdir(parents=True)
    files = sorted((dataset / "train").rglob("*.jpg"))
    start = 0
    for n, stop in enumerate(split):
        with tarfile.open(out / f"data-{n:06d}.tar", "w|", format=tarfile.PAX_FORMAT) as tar:
            for i, path in enumerate(files[start:stop], start):
                key = f"sample{i:06d}" if i != 3 else "long/" + "k" * 120
                members = {"jpg": path.read_bytes(), "json": json.dumps({"i": i}).encode()}
                if labelled:
                    members["cls"] = path.parent.name[-1].encode()
                for ext in sorted(members, reverse=n == 1):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode, info.uname = len(members[ext]), 0o444, "bigdata"
                    tar.addfile(info, io.BytesIO(members[ext]))
        start = stop
    return out


def test_index_makes_a_foreign_webdataset_set_readable(dataset, tmp_path, capsys):
    from dali_ipmix.cli import main
    from wds2idx import IndexCreator
    data = _foreign_set(dataset, tmp_path / "wds")
    for where in (data, f"{data}/data-*.tar"):       # refused, naming the command that fixes it
        with pytest.raises(UserError, match=rf"without manifest.json .*`dali-ipmix shard --index {data}`"):
            sources.open_source(where)
    classes = tmp_path / "classes.txt"
    classes.write_text("n01\nn02\nn03\n")
    assert main(["shard", "--index", str(data), "--classes", str(classes)]) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["classes"] == ["n01", "n02", "n03"] and manifest["class_counts"] == [4, 4, 4]
    assert [s["samples"] for s in manifest["shards"]] == [7, 5] and manifest["samples"] == 12
    for s in manifest["shards"]:                     # DALI's own tool writes the same index
        tar = data / s["tar"]
        assert hashlib.sha256(tar.read_bytes()).hexdigest() == s["sha256"] and tar.stat().st_size == s["bytes"]
        IndexCreator(str(tar), str(tmp_path / "ref.idx"), verbose=False).create_index()
        assert (tmp_path / "ref.idx").read_text() == (data / s["index"]).read_text()
    # DALI's reader takes the picture and the label, and skips the .json members
    assert _samples(data) == _samples(dataset / "train")
    assert _eval_items(data) == _eval_items(dataset / "train")      # eval's PIL reads too
    assert main(["verify", str(data)]) == 0
    # never overwritten without --overwrite; with it, the default class names
    before = (data / "manifest.json").read_bytes()
    capsys.readouterr()
    assert main(["shard", "--index", str(data)]) == 2
    assert "manifest.json exists already; pass --overwrite" in capsys.readouterr().err
    assert (data / "manifest.json").read_bytes() == before
    assert main(["shard", "--index", str(data), "--overwrite"]) == 0
    assert json.loads((data / "manifest.json").read_text())["classes"] == ["class0", "class1", "class2"]
    # a set without .cls members is a mixing set
    mixing = _foreign_set(dataset, tmp_path / "mixing", labelled=False, split=(12,))
    assert shard.index_set(mixing, log=lambda *a: None)["classes"] == []
    assert sources.open_source(mixing, labelled=False).size == 12


def test_index_is_atomic_and_refuses_what_it_cannot_index(dataset, tmp_path, monkeypatch, capsys):
    from dali_ipmix.cli import main
    data = _foreign_set(dataset, tmp_path / "wds")
    before = sorted(p.name for p in data.iterdir())
    # stopped while hashing the second shard
    monkeypatch.setattr(hashlib, "file_digest", _stopped_on_second_call(hashlib.file_digest))
    with pytest.raises(KeyboardInterrupt):
        shard.index_set(data, log=lambda *a: None)
    monkeypatch.undo()
    assert sorted(p.name for p in data.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # an existing index that differs from the tar is kept unless --overwrite
    (data / "data-000000.idx").write_text("v1.2 1\njpg 512 10 x.jpg\n")
    with pytest.raises(UserError, match="data-000000.idx differs from the index of data-000000.tar"):
        shard.index_set(data, log=lambda *a: None)

    def one_line(*argv):
        assert main(["shard", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err, err
        return err
    twice = tmp_path / "twice.txt"
    twice.write_text("a\nb\na\n")
    assert "'a' is named twice" in one_line("--index", str(data), "--classes", str(twice), "--overwrite")
    assert (data / "data-000000.idx").read_text() == "v1.2 1\njpg 512 10 x.jpg\n"   # left as it was
    few = tmp_path / "few.txt"
    few.write_text("a\nb\n")
    assert "2 names but the .cls members go up to label 2" in one_line("--index", str(data), "--classes",
                                                                        str(few), "--overwrite")
    assert "index a local copy" in one_line("--index", "s3://data/wds")
    # a read-only copy of a set (shared storage): one line before the scan, not a traceback
    def read_only(*a, **kw):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(shard.tempfile, "NamedTemporaryFile", read_only)
    assert "cannot write into it (Permission denied)" in one_line("--index", str(data), "--overwrite")
    monkeypatch.undo()
    assert "SRC applies to `dali-ipmix shard SRC OUT`" in one_line(str(dataset), "--index", str(data))
    assert "--classes applies to --index" in one_line(str(dataset / "train"), str(tmp_path / "o"),
                                                      "--classes", str(few))
    # a sample without its label while others have one; a label with a line break
    bad = _foreign_set(dataset, tmp_path / "bad", split=(12,))
    with tarfile.open(bad / "data-000000.tar", "a") as tar:
        import io
        info = tarfile.TarInfo("zz.jpg")
        payload = (dataset / "train" / "class0" / "000.jpg").read_bytes()
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    assert "sample zz has no .cls member while others have one" in one_line("--index", str(bad))
    bad2 = tmp_path / "bad2"
    bad2.mkdir()
    with tarfile.open(bad2 / "a.tar", "w") as tar:
        import io
        for name, payload in (("k.cls", b"1\n"), ("k.jpg", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert "is b'1\\n', not a label (decimal digits only" in one_line("--index", str(bad2))
    assert [p.name for p in bad2.iterdir()] == ["a.tar"]


# ---------------------------------------------------------------------------------------------
# dali-ipmix shard s3://...: class folders read from S3 into local shards

def test_shard_from_s3_equals_shard_from_the_local_copy(dataset, aws, tmp_path, monkeypatch, capsys):
    from dali_ipmix.cli import main
    data = tmp_path / "train"
    shutil.copytree(dataset / "train", data)
    (data / "class1" / "zz.jpg").write_bytes((data / "class1" / "001.jpg").read_bytes()[:500])
    s3.upload_tree(data, "s3://data/to-shard", aws)
    local = shard.convert(data, tmp_path / "local", count=2, jobs=1, log=lambda *a: None)
    reads = []
    real = sources.read_bytes
    monkeypatch.setattr(sources, "read_bytes", lambda where, *a: reads.append(where) or real(where, *a))
    assert main(["shard", "s3://data/to-shard", str(tmp_path / "remote"), "--shards", "2"]) == 0
    assert "left out 1 bad picture(s)" in capsys.readouterr().out
    reads = [r for r in reads if r.startswith("s3://")]
    assert len(reads) == 13 and len(set(reads)) == 13          # each picture read once
    remote = json.loads((tmp_path / "remote" / "manifest.json").read_text())
    for key in ("samples", "classes", "class_counts", "left_out", "picture_size"):
        assert remote[key] == local[key], key
    assert (tmp_path / "remote" / "left_out.txt").read_text().startswith("class1/zz.jpg\t")
    assert _samples(tmp_path / "remote") == _samples(tmp_path / "local") == _samples(dataset / "train")
    # an object that cannot be read (gone since the listing) stops the run: nothing is written
    listing = s3.list_prefix("s3://data/to-shard")
    monkeypatch.setattr(s3, "list_prefix", lambda *a: s3.Listing(
        listing.uri, dict(listing.objects, **{"class0/ghost.jpg": 100})))
    with pytest.raises(UserError, match=r"SRC s3://data/to-shard/class0/ghost.jpg: cannot be read .*nothing"):
        shard.convert("s3://data/to-shard", tmp_path / "ghost", count=2, log=lambda *a: None)
    assert not (tmp_path / "ghost").exists() or not any((tmp_path / "ghost").iterdir())
    with pytest.raises(UserError, match="writes a local folder"):
        shard.convert(data, "s3://data/out", log=lambda *a: None)
