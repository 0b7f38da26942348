"""train.py on CPU: learning, JSD loss, DDP over gloo, checkpoint/resume, interruption, bad input."""
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from conftest import FullDisk, two_ranks
from dali_ipmix import outputs
from dali_ipmix.training import checkpoint, metrics
from dali_ipmix.losses import ipmix_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(nn.Module):
    """Small enough for many steps in a test, with batch norm (buffers) like the real models."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


def tiny_factory(num_classes):
    torch.manual_seed(0)
    return TinyNet(num_classes)


def slow_tiny_factory(num_classes):
    """tiny_factory whose training steps take 0.2 s: a signal sent from outside once step 2 is in
    metrics.jsonl arrives long before the run's last step (unslowed, the run can end first)."""
    net = tiny_factory(num_classes)
    forward = net.forward

    def slow(x):
        if net.training:
            time.sleep(0.2)
        return forward(x)
    net.forward = slow
    return net


def _args(dataset, out, *extra):
    return ["--data-path", str(dataset), "--mixing-set", str(dataset / "mixing"),
            "--output-dir", str(out), "--image-size", "32", "--batch-size", "4", "--workers", "1",
            "--epochs", "2", "--lr", "0.05", "--k", "2", "--t", "2", "--print-freq", "1",
            "--no-tensorboard", *extra]


def _params(path):
    state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    return {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}


def _latest(out):
    return checkpoint.find_checkpoints(out)[-1][1]


# ---------------------------------------------------------------------------------------------
# Learning on a fixed batch of real pipeline output

def test_steps_on_fixed_batch_lower_the_loss(dataset):
    from dali_ipmix import config as C
    from dali_ipmix.loader import DaliLoader
    from pipelines.imagenet import train_pipeline
    cfg = C.IMAGENET.replace(k=2, t=2, image_size=32, patch_sizes=(4, 8, 16, 32))
    pipe = train_pipeline(dataset / "train", dataset / "mixing", cfg=cfg, batch_size=4,
                          num_threads=1, device="cpu", seed=1)
    images, labels = next(iter(DaliLoader(pipe)))
    assert images.shape == (12, 3, 32, 32) and labels.shape == (4,)
    model = tiny_factory(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    losses = []
    for _ in range(30):
        loss, _ = ipmix_loss(model(images), labels, 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# Checkpoint / resume

def test_resume_equals_uninterrupted(dataset, tmp_path):
    # 12 images / batch 4 = 3 steps per epoch: 4 steps cross an epoch
    # boundary and stopping after 2 stops mid-epoch, so the DALI reader state must be restored.
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(_args(dataset, a, "--max-steps", "4"), model_factory=tiny_factory) == 0
    assert train.main(_args(dataset, b, "--max-steps", "2"), model_factory=tiny_factory) == 0
    assert train.main(_args(dataset, b, "--max-steps", "4", "--resume", "auto"),
                      model_factory=tiny_factory) == 0
    pa, pb = _params(_latest(a)), _params(_latest(b))
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=1e-6, msg=k)
    # same data order: the per-step losses of steps 3 and 4 agree
    loss = lambda d: {r["step"]: r["loss"] for r in map(json.loads, open(d / "metrics.jsonl"))  # noqa
                      if r["kind"] == "step"}
    la, lb = loss(a), loss(b)
    assert [la[s] for s in (1, 2, 3, 4)] == pytest.approx([lb[s] for s in (1, 2, 3, 4)], abs=1e-5)
    # the resumed run marks where it continued, between the steps of its two parts
    records = [json.loads(line) for line in open(b / "metrics.jsonl")]
    marks = [i for i, r in enumerate(records) if r["kind"] == "resume"]
    assert len(marks) == 1 and records[marks[0]]["step"] == 2
    assert int(checkpoint.CKPT_PATTERN.match(os.path.basename(records[marks[0]]["checkpoint"])).group(1)) == 2
    assert {r["step"] for r in records[marks[0]:] if r["kind"] == "step"} == {3, 4}


def test_existing_checkpoints_are_not_overwritten(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(_args(dataset, out, "--max-steps", "1"), model_factory=tiny_factory) == 0
    before = open(_latest(out), "rb").read()
    assert train.main(_args(dataset, out, "--max-steps", "1"), model_factory=tiny_factory) == 2
    assert "already holds 1 checkpoint" in capsys.readouterr().err
    assert open(_latest(out), "rb").read() == before


def test_failed_checkpoint_write_keeps_previous(dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 2:          # the second checkpoint: write part of it, then "disk full"
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    # the run goes on, but its last step is not on disk: exit 1, naming the newest checkpoint
    assert train.main(_args(dataset, out, "--max-steps", "2", "--ckpt-every", "1"),
                      model_factory=tiny_factory) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "checkpoint_00000001.pth kept" in err
    assert "the newest on disk is" in err.splitlines()[-1]
    assert [s for s, _ in checkpoint.find_checkpoints(out)] == [1]
    assert not glob.glob(str(out / ".tmp-*"))
    ckpt = torch.load(out / "checkpoint_00000001.pth", weights_only=False)
    assert ckpt["step"] == 1 and "model" in ckpt


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes_to_same_weights(dataset, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    script = ("import sys, train, test_train; "
              "sys.exit(train.main(sys.argv[1:], model_factory=test_train.slow_tiny_factory))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    cmd = [sys.executable, "-c", script]
    total = "6"
    proc = subprocess.Popen(cmd + _args(dataset, b, "--max-steps", total, "--epochs", "3"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = b / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"step": 2' in metrics.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out and "--resume auto" in out
    stopped_at = checkpoint.find_checkpoints(b)[-1][0]
    assert 2 <= stopped_at < int(total)
    resumed = subprocess.run(cmd + _args(dataset, b, "--max-steps", total, "--epochs", "3",
                                         "--resume", "auto"),
                             env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert train.main(_args(dataset, a, "--max-steps", total, "--epochs", "3"),
                      model_factory=tiny_factory) == 0
    pa, pb = _params(_latest(a)), _params(_latest(b))
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=1e-6, msg=k)


# ---------------------------------------------------------------------------------------------
# Distributed (gloo)

# train.py on one rank; the model it trained is saved as ARGV1<rank>.pt
SAVE_RANK_MODEL = ("import os, sys, torch, train, test_train\n"
                   "models = []\n"
                   "def factory(n):\n"
                   "    models.append(test_train.tiny_factory(n)); return models[-1]\n"
                   "rc = train.main(sys.argv[2:], model_factory=factory)\n"
                   "torch.save(models[0].state_dict(), sys.argv[1] + os.environ['RANK'] + '.pt')\n"
                   "sys.exit(rc)\n")


# train.py where rank 1 loads an older checkpoint than rank 0 (step and weights changed)
OTHER_FILE_ON_RANK_1 = ("import os, sys, torch, train, test_train\n"
                        "if os.environ['RANK'] == '1':\n"
                        "    real = torch.load\n"
                        "    def older(*a, **k):\n"
                        "        ckpt = real(*a, **k)\n"
                        "        if isinstance(ckpt, dict) and 'model' in ckpt:\n"
                        "            ckpt['step'] -= 1\n"
                        "            ckpt['model'] = {k: v + 1 if v.is_floating_point() else v\n"
                        "                             for k, v in ckpt['model'].items()}\n"
                        "        return ckpt\n"
                        "    torch.load = older\n"
                        "sys.exit(train.main(sys.argv[1:], model_factory=test_train.tiny_factory))\n")


@pytest.mark.slow
def test_two_gloo_ranks_hold_identical_weights(dataset, tmp_path):
    # 12 images / 2 ranks = 6 per shard: batch 2 gives 3 steps per epoch on each rank
    args = _args(dataset, tmp_path / "run", "--max-steps", "4", "--batch-size", "2")
    codes, outs = two_ranks(SAVE_RANK_MODEL, str(tmp_path / "r"), *args, timeout=240)
    assert codes == [0, 0], outs
    w0, w1 = (torch.load(tmp_path / f"r{r}.pt") for r in range(2))
    for k in w0:
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0, msg=k)
    init = tiny_factory(3).state_dict()      # and they did train (moved from the initial weights)
    assert any(not torch.equal(w0[k], init[k]) for k in w0 if "running" not in k)
    # only rank 0 writes; the progress is printed once
    assert "summary:" in outs[0] and "summary:" not in outs[1]
    ckpt = torch.load(_latest(tmp_path / "run"), weights_only=False)
    assert ckpt["world_size"] == 2 and len(ckpt["loader_state"]["positions"]) == 2
    # resumed on two ranks where rank 1 reads another checkpoint at that path (an older file on a
    # node-local disk): every rank stops with one line, none trains on apart
    more = _args(dataset, tmp_path / "run", "--max-steps", "6", "--batch-size", "2", "--resume", "auto")
    codes, outs = two_ranks(OTHER_FILE_ON_RANK_1, *more, timeout=240)
    assert codes == [2, 2], outs
    for out in outs:
        assert "the ranks loaded different checkpoints" in out and "Traceback" not in out, out


@pytest.mark.slow
def test_two_ranks_evaluate_the_saved_model_on_the_same_images_in_both_passes(dataset, tmp_path):
    # adversarial mode on 2 gloo ranks without --sync-bn: the clean validation and the robust
    # check of an epoch measure the model rank 0 saves (its BatchNorm statistics on every rank),
    # on the same shards (the clean accuracy of both passes agrees)
    out = tmp_path / "run"
    args = _args(dataset, out, "--epochs", "1", "--batch-size", "2", "--adv-mixup", "aom",
                 "--adv-steps", "1", "--adv-val-images", "0")
    codes, outs = two_ranks(SAVE_RANK_MODEL, str(tmp_path / "r"), *args, timeout=240)
    assert codes == [0, 0], outs
    w0, w1 = (torch.load(tmp_path / f"r{r}.pt") for r in range(2))
    saved = torch.load(_latest(out), weights_only=False)["model"]
    for k in w0:                        # buffers included: one model, the saved one
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(w0[k], saved[k], rtol=0, atol=0, msg=k)
    epoch = _records(out, "epoch")[0]
    assert epoch["robust_images"] == epoch["val_images"] == 12
    assert epoch["robust_clean"] == pytest.approx(epoch["val_top1"])


@pytest.mark.slow
def test_a_demo_cache_that_cannot_be_made_fails_every_rank_in_one_line(tmp_path):
    # rank 0 makes the demo data; its error must reach rank 1, which waits for the paths
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    script = "import sys, train\nsys.exit(train.main(sys.argv[1:]))\n"
    codes, outs = two_ranks(script, "--demo-cache", str(blocker / "cache"),
                             "--output-dir", str(tmp_path / "run"))
    assert codes == [2, 2], outs
    for out in outs:
        error = [line for line in out.splitlines() if line.startswith("train.py: error:")]
        assert len(error) == 1 and "--demo-cache" in error[0] and "Traceback" not in out, out


# ---------------------------------------------------------------------------------------------
# Bad input: one line, before any work

@pytest.mark.parametrize("case", ["arch", "batch", "val", "output", "ckpt_arch", "crop", "loop"])
def test_bad_input_one_line_error(case, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _args(dataset, out)
    if case == "arch":
        argv += ["--arch", "resnet9000"]
        expect = "unknown --arch 'resnet9000'"
    elif case == "batch":
        argv += ["--batch-size", "64"]
        expect = "--batch-size 64 is larger than a shard"
    elif case == "val":
        nval = tmp_path / "noval"
        os.makedirs(nval / "train")
        os.symlink(dataset / "train" / "class0", nval / "train" / "class0")
        argv = _args(nval, out)
        argv[3] = str(dataset / "mixing")
        expect = "validation folder .*noval/val does not exist"
    elif case == "output":
        (tmp_path / "afile").write_text("x")
        argv = _args(dataset, tmp_path / "afile" / "sub")
        expect = "--output-dir .*afile/sub is not writable"
    elif case == "ckpt_arch":
        ckpt = tmp_path / "other.pth"
        torch.save({"model": {}, "arch": "resnet34"}, ckpt)
        argv += ["--arch", "resnet18", "--resume", str(ckpt)]
        expect = "checkpoint of --arch resnet34, but this run uses --arch resnet18"
    elif case == "loop":        # a file linked to itself among the training pictures
        loopy = tmp_path / "loopy"
        shutil.copytree(dataset / "train", loopy / "train", symlinks=True)
        os.symlink(dataset / "val", loopy / "val")
        os.symlink("loop.jpg", loopy / "train" / "class1" / "loop.jpg")
        argv = _args(loopy, out)
        argv[3] = str(dataset / "mixing")
        expect = "class1/loop.jpg is a symbolic link loop"
    else:
        argv += ["--crop-scale", "1.5"]
        expect = "--crop-scale must be in"
    t0 = time.time()
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error:"), err
    import re
    assert re.search(expect, err), err
    assert not checkpoint.find_checkpoints(out) if out.exists() else True
    assert time.time() - t0 < 30


@pytest.mark.slow
def test_bad_file_mid_run_names_it_and_filelist_skips_it(dataset, tmp_path, capsys):
    import shutil
    from dali_ipmix import verify
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    bad = data / "train" / "class1" / "zz_truncated.jpg"
    bad.write_bytes((data / "train" / "class1" / "001.jpg").read_bytes()[:600])
    out = tmp_path / "run"
    assert train.main(_args(data, out, "--max-steps", "6"), model_factory=tiny_factory) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "zz_truncated.jpg" in err and "--train-filelist" in err
    report = verify.scan(data / "train")
    files, labels = report.good()
    assert "class1/zz_truncated.jpg" not in files and len(files) == 12
    good = verify.write_filelist(tmp_path / "good.txt", files, labels)
    assert train.main(_args(data, tmp_path / "run2", "--max-steps", "6", "--train-filelist",
                            str(good)), model_factory=tiny_factory) == 0


@pytest.mark.parametrize("mode", ["aom", "mixup_pgd"])
def test_adversarial_mixup_mode_trains_and_reports_robust_accuracy(mode, dataset, tmp_path):
    out = tmp_path / "run"
    argv = _args(dataset, out, "--epochs", "1", "--adv-mixup", mode, "--adv-steps", "2",
                 "--adv-eval", "pgd", "--adv-eval-steps", "2", "--adv-eval-images", "8")
    assert train.main(argv, model_factory=tiny_factory) == 0
    summary = json.load(open(out / "summary.json"))
    robust = summary["robust"][0]
    assert robust["images"] == 8 and 0 <= robust["pgd"] <= robust["clean"] <= 100
    ckpt = torch.load(_latest(out), weights_only=False)
    # the bare network is stored (loadable without the pixel wrapper); the input kind is recorded
    assert set(ckpt["model"]) == set(tiny_factory(3).state_dict())
    assert ckpt["input"]["pixels_0_1"] is True
    steps = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert all(np.isfinite(r["loss"]) for r in steps if r["kind"] == "step")


@pytest.mark.slow
def test_cifar_adv_schedule_per_epoch_robust_check_and_best_robust(dataset, tmp_path, capsys):
    from dali_ipmix.robustness import load_checkpoint
    out = tmp_path / "run"
    # 12 images / batch 4 = 3 steps per epoch, 4 epochs: the three lr phases of the schedule
    argv = _args(dataset, out, "--preset", "cifar-adv", "--arch", "tiny_cnn", "--epochs", "4",
                 "--adv-steps", "1", "--keep-ckpts", "10")
    assert train.main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 view(s)," in printed and "+ JSD" not in printed          # no JSD triple by default
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    # recorded after step s: the lr of step s + 1, i.e. Rice's lr at (s + 1) / 12 of training
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert lrs == pytest.approx([0.05] * 4 + [0.005] * 3 + [0.0005] * 5)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert all(r["robust_images"] == 12 and 0 <= r["robust_pgd"] <= r["robust_clean"] for r in epochs)
    assert all(f"epoch {e}/4: PGD-10 check (12 images, eps 8/255, float32)" in printed for e in range(1, 5))
    best_pgd = max(r["robust_pgd"] for r in epochs)
    best_epoch = next(r["epoch"] for r in epochs if r["robust_pgd"] == best_pgd)   # the first of a tie
    assert [r["best_robust_pgd"] for r in epochs] == [max(x["robust_pgd"] for x in epochs[:i + 1])
                                                       for i in range(4)]
    best = torch.load(out / "best_robust.pth", weights_only=False)
    assert best["epoch"] == best_epoch and best["robust"]["robust_pgd"] == best_pgd
    ckpt = torch.load(out / f"checkpoint_{3 * best_epoch:08d}.pth", weights_only=False)
    for k, v in ckpt["model"].items():                  # the weights of that epoch, not the last
        assert torch.equal(best["model"][k], v), k
    assert ckpt["optimizer"]["param_groups"][0]["nesterov"] is False
    loaded = load_checkpoint(out / "best_robust.pth")    # what `dali-ipmix eval` reads
    assert loaded.arch == "tiny_cnn" and loaded.args["preset"] == "cifar" and loaded.num_classes == 3
    summary = json.load(open(out / "summary.json"))
    assert summary["best_robust"]["epoch"] == best_epoch
    # a folder holding only best_robust.pth is another run's result too
    for _, path in checkpoint.find_checkpoints(out):
        os.unlink(path)
    assert train.main(argv) == 2
    assert "best_robust.pth" in capsys.readouterr().err


class AutocastRecorder(TinyNet):
    """Records, per forward, whether it was an evaluation forward with gradients (an attack or the
    robust evaluation's clean pass: eval mode, not inference mode) and whether autocast was on."""

    def __init__(self, num_classes):
        super().__init__(num_classes)
        self.calls = []

    def forward(self, x):
        robust_eval = not self.training and not torch.is_inference_mode_enabled()
        self.calls.append((robust_eval, torch.is_autocast_enabled("cpu")))
        return super().forward(x)


def test_robust_evaluation_runs_in_float32_under_bf16_training(dataset, tmp_path):
    nets = []

    def factory(num_classes):
        torch.manual_seed(0)
        nets.append(AutocastRecorder(num_classes))
        return nets[-1]
    argv = _args(dataset, tmp_path / "run", "--epochs", "1", "--amp", "bf16", "--adv-mixup", "mixup_pgd",
                 "--adv-steps", "1", "--adv-eval", "pgd", "--adv-eval-steps", "2")
    assert train.main(argv, model_factory=factory) == 0
    calls = nets[0].calls
    assert any(amp for robust, amp in calls if not robust)            # training did run under bf16
    robust = [amp for is_robust, amp in calls if is_robust]
    assert robust and not any(robust), f"{sum(robust)} of {len(robust)} robust-eval forwards under autocast"


def test_cifar_preset_with_preactresnet(dataset, tmp_path):
    out = tmp_path / "run"
    argv = _args(dataset, out, "--preset", "cifar", "--arch", "preactresnet18", "--max-steps", "1",
                 "--no-jsd")
    argv[argv.index("--image-size") + 1] = "32"
    assert train.main(argv) == 0
    ckpt = torch.load(_latest(out), weights_only=False)
    assert ckpt["arch"] == "preactresnet18" and ckpt["args"]["preset"] == "cifar"


# ---------------------------------------------------------------------------------------------
# The output folder: --overwrite, a full disk, a stop on an epoch's last step, a second run

def _records(out, kind):
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == kind]


def test_overwrite_deletes_the_previous_runs_files(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(_args(dataset, out, "--max-steps", "6", "--ckpt-every", "1", "--keep-ckpts", "9"),
                      model_factory=tiny_factory) == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert train.main(_args(dataset, out, "--max-steps", "1", "--keep-ckpts", "1", "--overwrite"),
                      model_factory=tiny_factory) == 0
    # pruning kept this run's checkpoint, so --resume auto continues this run
    assert [s for s, _ in checkpoint.find_checkpoints(out)] == [1]
    assert [r["step"] for r in _records(out, "step")] == [1] and not _records(out, "epoch")
    assert json.load(open(out / "summary.json"))["steps"] == 1
    assert (out / "notes.txt").read_text() == "mine"
    assert "deleted the previous run's files" in capsys.readouterr().out


def test_metrics_of_an_earlier_run_need_a_decision(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "step", "step": 7, "loss": 1.0}\n')
    assert train.main(_args(dataset, out, "--max-steps", "1"), model_factory=tiny_factory) == 2
    err = capsys.readouterr().err
    assert "already holds metrics.jsonl" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text().count("\n") == 1
    assert train.main(_args(dataset, out, "--overwrite", "--resume", "auto")) == 2
    assert "give one of them" in capsys.readouterr().err


def test_a_full_disk_warns_and_later_writes_catch_up(dataset, tmp_path, monkeypatch, capsys):
    disk = FullDisk()
    monkeypatch.setattr(outputs, "os", disk)     # checkpoints and summary.json
    monkeypatch.setattr(metrics, "os", disk)     # metrics.jsonl

    def factory(n):
        net, calls = tiny_factory(n), [0]
        forward = net.forward

        def filling(x):
            if net.training:             # steps 2 and 3 (and the end of epoch 1) on a full disk
                calls[0] += 1
                disk.fill(calls[0] in (2, 3))
            return forward(x)
        net.forward = filling
        return net

    out = tmp_path / "run"
    assert train.main(_args(dataset, out, "--max-steps", "4", "--ckpt-every", "1"), model_factory=factory) == 0
    captured = capsys.readouterr()
    assert "writing checkpoint" in captured.err and "No space left on device" in captured.err
    assert "checkpoint_00000001.pth kept" in captured.err
    assert [s for s, _ in checkpoint.find_checkpoints(out)] == [1, 4]
    assert not glob.glob(str(out / ".tmp-*"))
    # every metrics record arrives once, in order, as whole lines, once space returns
    assert [r["step"] for r in _records(out, "step")] == [1, 2, 3, 4]
    assert [r["epoch"] for r in _records(out, "epoch")] == [1]
    summary = captured.out[captured.out.index("summary:"):]
    assert "failed write: checkpoint_00000002.pth (No space left on device)" in summary
    assert "failed write: checkpoint_00000003.pth" in summary
    assert "failed write: metrics.jsonl" in summary and "every record written later" in summary
    assert len(json.load(open(out / "summary.json"))["failed_writes"]) == 4  # ckpt 2, 3 (twice), metrics


def test_a_disk_full_from_the_first_checkpoint_on_is_no_success(dataset, tmp_path, monkeypatch, capsys):
    disk = FullDisk()
    monkeypatch.setattr(outputs, "os", disk)     # checkpoints and summary.json
    disk.fill(True)
    out = tmp_path / "run"
    assert train.main(_args(dataset, out, "--max-steps", "2", "--ckpt-every", "1"),
                      model_factory=tiny_factory) == 1
    captured = capsys.readouterr()
    assert "checkpoint of step 2: NOT WRITTEN" in captured.out
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("train.py: error: the checkpoint of step 2 could not be written")
    assert "no checkpoint of this run is on disk" in err
    assert checkpoint.find_checkpoints(out) == [] and not glob.glob(str(out / ".tmp-*"))


def test_resume_auto_on_a_finished_run_says_so_and_changes_nothing(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(_args(dataset, out, "--epochs", "1"), model_factory=tiny_factory) == 0
    def files():   # contents and modification times: not even the lock file is written again
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()}
    before = files()
    capsys.readouterr()
    assert train.main(_args(dataset, out, "--epochs", "1", "--resume", "auto"),
                      model_factory=tiny_factory) == 0
    printed = capsys.readouterr().out.strip()
    assert len(printed.splitlines()) == 1 and "the run is complete (all 1 epochs are done, step 3)" in printed
    assert "larger --epochs" in printed and "summary:" not in printed
    assert files() == before


def _stopping_factory(sigterm_at):
    """tiny_factory whose training forward of step ``sigterm_at`` sends this process SIGTERM."""
    def factory(n):
        net, calls = tiny_factory(n), [0]
        forward = net.forward

        def stopping(x):
            if net.training:
                calls[0] += 1
                if calls[0] == sigterm_at:
                    os.kill(os.getpid(), signal.SIGTERM)
            return forward(x)
        net.forward = stopping
        return net
    return factory


@pytest.mark.parametrize("stop", ["sigterm", "max_steps"])
def test_stop_on_an_epochs_last_step_resumes_with_its_validation(stop, dataset, tmp_path):
    # 3 steps per epoch; the run stops after step 3, the last of epoch 1
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(_args(dataset, a, "--epochs", "3"), model_factory=tiny_factory) == 0
    if stop == "sigterm":
        rc = train.main(_args(dataset, b, "--epochs", "3"), model_factory=_stopping_factory(3))
        assert rc == 128 + signal.SIGTERM
        assert not os.path.exists(b / "metrics.jsonl") or not _records(b, "epoch")   # validation is due
    else:
        assert train.main(_args(dataset, b, "--epochs", "3", "--max-steps", "3"),
                          model_factory=tiny_factory) == 0
        assert [(r["epoch"], r["step"]) for r in _records(b, "epoch")] == [(1, 3)]   # validated first
    assert train.main(_args(dataset, b, "--epochs", "3", "--resume", "auto"), model_factory=tiny_factory) == 0
    assert [r["step"] for r in _records(b, "step")] == list(range(1, 10))
    assert [(r["epoch"], r["step"]) for r in _records(b, "epoch")] == [(1, 3), (2, 6), (3, 9)]
    loss = lambda d: [round(r["loss"], 5) for r in _records(d, "step")]  # noqa: E731
    assert loss(a) == loss(b)
    pa, pb = _params(_latest(a)), _params(_latest(b))
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_second_run_into_a_busy_output_dir_is_refused(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    script = ("import sys, train, test_train; "
              "sys.exit(train.main(sys.argv[1:], model_factory=test_train.tiny_factory))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    proc = subprocess.Popen([sys.executable, "-c", script, *_args(dataset, out, "--epochs", "60")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and '"step": 1' in (out / "metrics.jsonl").read_text():
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0]
        for extra in ([], ["--overwrite"]):
            assert train.main(_args(dataset, out, "--max-steps", "1", *extra), model_factory=tiny_factory) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "in use by another train.py run" in err
            assert f"pid {proc.pid} on {socket.gethostname()}" in err
        assert (out / "metrics.jsonl").exists()           # --overwrite deleted nothing
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    # the lock ends with its process: the stopped run can be continued
    assert train.main(_args(dataset, out, "--epochs", "60", "--max-steps", "1", "--resume", "auto"),
                      model_factory=tiny_factory) == 0


# ---------------------------------------------------------------------------------------------
# Flags and resumes that do not fit: one line, before any work

@pytest.mark.parametrize("flag, value, expect", [
    ("--lr", "-1", "--lr must be in (0, 10]"),
    ("--lr", "nan", "--lr must be in (0, 10], got nan"),
    ("--momentum", "-5", "--momentum must be in (0, 1)"),
    ("--wd", "nan", "--wd must be a finite number >= 0"),
    ("--label-smoothing", "2", "--label-smoothing must be in [0, 1)"),
    ("--jsd-weight", "nan", "--jsd-weight must be a finite number >= 0"),
    ("--print-freq", "0", "--print-freq must be >= 1"),
    ("--max-steps", "-2", "--max-steps must be >= 0"),
    ("--adv-eval", "autoattack", "AutoAttack's targeted attacks need a model with >= 4 classes"),
])
def test_bad_numbers_are_refused_before_any_work(flag, value, expect, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _args(dataset, out, "--max-steps", "2")
    argv += [flag, value]
    assert train.main(argv, model_factory=tiny_factory) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not out.exists()


@pytest.mark.parametrize("extra, expect", [
    (["--lr", "1e308"], "--lr must be in (0, 10], got 1e+308"),
    (["--image-size", "100000"], "--image-size must be in 8..4096 px, got 100000"),
    (["--adv-mixup", "aom", "--adv-lambda-step", "inf"], "--adv-lambda-step must be in [0, 1]"),
    (["--output-dir", ""], "--output-dir is empty"),
    (["--no-jsd", "--jsd-weight", "5"], "--jsd-weight 5 has no effect without the JSD loss"),
    (["--adv-mixup", "aom", "--jsd-weight", "5"], "or an adversarial mode without --adv-jsd"),
    (["--max-pixels", "0"], "--max-pixels must be >= 1"),
])
def test_values_that_cannot_be_meant_are_refused(extra, expect, dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train.main(_args(dataset, tmp_path / "run", *extra), model_factory=tiny_factory) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert os.listdir(tmp_path) == []


def test_a_start_that_fails_leaves_no_folder_holding_only_the_lock(dataset, tmp_path, capsys):
    out = tmp_path / "new"
    assert train.main(_args(dataset, out, "--resume", "auto"), model_factory=tiny_factory) == 2
    assert "no checkpoint_*.pth" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()                        # a folder the user made is left, lock file and all
    assert train.main(_args(dataset, out, "--resume", "auto"), model_factory=tiny_factory) == 2
    assert out.is_dir()


def test_resume_that_does_not_fit_and_labels_out_of_range(dataset, tmp_path, capsys):
    import shutil
    out = tmp_path / "run"
    assert train.main(_args(dataset, out, "--max-steps", "1"), model_factory=tiny_factory) == 0
    ckpt = _latest(out)
    capsys.readouterr()
    # another batch size would change the schedule's length and the data position
    assert train.main(_args(dataset, out, "--resume", "auto", "--batch-size", "2"), model_factory=tiny_factory) == 2
    assert "trained with --batch-size 4, this run has 2" in capsys.readouterr().err
    # another class count: the checkpoint's classifier does not fit
    two = tmp_path / "two"
    for split in ("train", "val"):
        for c in ("class0", "class1"):
            shutil.copytree(dataset / split / c, two / split / c)
    argv = _args(two, tmp_path / "new", "--resume", str(ckpt))
    argv[argv.index("--mixing-set") + 1] = str(dataset / "mixing")
    assert train.main(argv, model_factory=tiny_factory) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint of a 3-class model" in err and "2 classes" in err
    # a file list whose label has no class folder
    listed = tmp_path / "list.txt"
    listed.write_text("class0/000.jpg 0\nclass1/001.jpg 7\n")
    assert train.main(_args(dataset, tmp_path / "r2", "--max-steps", "1", "--batch-size", "2",
                            "--train-filelist", str(listed)), model_factory=tiny_factory) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(listed) in err and "label 7" in err and "out of range" in err


def test_missing_train_dir_is_named_as_given(dataset, tmp_path, capsys):
    argv = ["--train-dir", str(tmp_path / "nope"), "--val-dir", str(dataset / "val"),
            "--mixing-set", str(dataset / "mixing"), "--output-dir", str(tmp_path / "run")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--train-dir {tmp_path / 'nope'}: no such folder" in err and "--data-path" not in err


@pytest.mark.parametrize("command", ["train.py", "eval", "bench"])
def test_help_states_each_default_once(command, capsys):
    from dali_ipmix import cli
    if command == "train.py":
        text = train.get_args_parser().format_help()
    else:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    joined = " ".join(text.split())              # argparse wraps lines
    assert not re.search(r"\(default[^)]*\) \(default", joined) and "(default (" not in joined
    # a default the help does not say itself is added
    assert {"train.py": "(default: 4)", "eval": "steps (paper: 20) (default: 20)", "bench": "(default: 32)"}[command] in joined


def test_progress_line_counts_to_the_step_it_stops_at(dataset, tmp_path, capsys):
    # 2 epochs x 3 steps, stopped after 4: "step N/4", the ETA counting to the same step
    assert train.main(_args(dataset, tmp_path / "run", "--max-steps", "4"), model_factory=tiny_factory) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if " step " in l and "loss" in l]
    assert [l.split(" step ")[1].split()[0] for l in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert lines[-1].endswith("ETA 0:00:00")
