"""examples/: each runs on the CPU on tiny generated data for a few steps; the two that resume
continue with the exact next batch (same weights as an uninterrupted run)."""
import importlib.util
import os

import pytest
import torch

from test_ipmix_loader import solid  # noqa: F401  (the fixture: one colour per file)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def example(name):
    """examples/<name>.py as a module (the folder is not a package: users copy the files)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weights(state):
    return {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


# 12 images / batch 4 = 3 steps an epoch: stopping after 2 stops mid-epoch, and 4 steps cross
# into the second epoch (through validation)

@pytest.mark.slow
def test_pytorch_loop_resumes_with_the_exact_next_batch(dataset, tmp_path):
    loop = example("pytorch_loop")

    def run(out, *extra):
        loop.main(loop.get_args_parser().parse_args([
            "--data-path", str(dataset), "--mixing", str(dataset / "mixing"), "--preset", "cifar",
            "--model", "resnet18", "--batch-size", "4", "--workers", "1", "--epochs", "2",
            "--lr", "0.05", "--output-dir", str(out), *extra]))
        return torch.load(out / "checkpoint.pth", weights_only=False)

    whole = run(tmp_path / "a", "--max-steps", "4")
    stopped = run(tmp_path / "b", "--max-steps", "2")
    assert (stopped["epoch"], stopped["step"]) == (0, 2)
    resumed = run(tmp_path / "b", "--max-steps", "4", "--resume", str(tmp_path / "b" / "checkpoint.pth"))
    assert (whole["epoch"], whole["step"]) == (resumed["epoch"], resumed["step"]) == (1, 4)
    _assert_same_weights(_weights(whole["model"]), _weights(resumed["model"]))
    assert not torch.equal(whole["model"]["fc.weight"], stopped["model"]["fc.weight"])


@pytest.mark.slow
def test_lightning_run_resumed_mid_epoch_from_its_checkpoint_matches_an_uninterrupted_one(
        dataset, tmp_path, monkeypatch):
    from dali_ipmix import IPMixLoader
    lit = example("lightning_module")
    steps = []                  # the batches training_step gets
    training_step = lit.IPMixClassifier.training_step
    monkeypatch.setattr(lit.IPMixClassifier, "training_step",
                        lambda self, batch, i: steps.append([t.clone() for t in batch]) or training_step(self, batch, i))

    def run(out, *extra):
        trainer = lit.main(lit.get_args_parser().parse_args([
            "--data-path", str(dataset), "--mixing", str(dataset / "mixing"), "--preset", "cifar",
            "--model", "resnet18", "--batch-size", "4", "--workers", "1", "--epochs", "2",
            "--lr", "0.05", "--devices", "1", "--output-dir", str(out), *extra]))
        return trainer, {k: v.clone() for k, v in trainer.lightning_module.model.state_dict().items()}

    _, whole = run(tmp_path / "a", "--max-steps", "4", "--ckpt-every", "2")
    # Lightning stops each epoch after len() batches and starts the next loop itself: it gets the
    # batches a plain loop over the same loader gets, across the epoch boundary
    plain = IPMixLoader(dataset / "train", dataset / "mixing", preset="cifar", batch_size=4, num_threads=1,
                        dtype="float32")
    expected = [[x.clone(), y.clone()] for _ in range(2) for x, y in plain][:4]
    assert len(steps) == 4
    for (x, y), (ex, ey) in zip(steps, expected):
        assert torch.equal(y, ey) and torch.equal(x, ex)
    _, stopped = run(tmp_path / "b", "--max-steps", "2", "--ckpt-every", "2")
    ckpt = tmp_path / "b" / "epoch=0-step=2.ckpt"
    # Lightning keeps the train dataloader's state_dict() in its checkpoint (fit loop, "combined_loader")
    saved = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert saved[0]["batch_size"] == 4 and saved[0]["positions"][0]
    trainer, resumed = run(tmp_path / "b", "--max-steps", "4", "--ckpt-every", "2", "--resume", str(ckpt))
    assert trainer.global_step == 4
    _assert_same_weights(_weights(whole), _weights(resumed))
    assert not torch.equal(whole["fc.weight"], stopped["fc.weight"])


@pytest.mark.slow
def test_timm_jsd_trains_on_view_major_chunks_with_the_clean_labels(solid, monkeypatch):
    import timm
    from dali_ipmix import config as C
    from test_ipmix_loader import _file_of
    ex = example("timm_jsd")
    batches = []                 # what the model and the loss were given at each step
    create, jsd = timm.create_model, ex.JsdCrossEntropy

    def recording_model(*a, **kw):
        model = create(*a, **kw)
        model.register_forward_pre_hook(lambda m, inp: batches.append([inp[0].detach().clone()]))
        return model

    class RecordingJsd(jsd):
        def __call__(self, output, target):
            batches[-1].append(target.clone())
            return super().__call__(output, target)

    monkeypatch.setattr(ex.timm, "create_model", recording_model)
    monkeypatch.setattr(ex, "JsdCrossEntropy", RecordingJsd)
    model, losses = ex.main(ex.get_args_parser().parse_args([
        "--data-path", str(solid / "train"), "--mixing", str(solid / "mixing"), "--preset", "cifar",
        "--model", "resnet10t", "--split-bn", "--steps", "4", "--batch-size", "4", "--workers", "1",
        "--lr", "0.01"]))
    assert len(losses) == len(batches) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    assert any(isinstance(m, timm.layers.SplitBatchNorm2d) for m in model.modules())
    for images, labels in batches:
        # the first third is the clean views, one file's colour each, of the labels' classes
        files = [_file_of(x, C.CIFAR) for x in images[:labels.numel()]]
        assert images.shape[0] == 3 * labels.numel() and None not in files, files
        assert [f % 3 for f in files] == labels.tolist()
