"""The public loaders (dali_ipmix.ipmix_loader): views layouts, exact resume through
state_dict/load_state_dict and its refusals, argument errors, two gloo ranks, the JSD loss beside
timm's JsdCrossEntropy."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import photo_crops, two_ranks
from dali_ipmix import IPMixLoader, IPMixValLoader, config as C
from dali_ipmix.losses import ipmix_loss

# 32-px crops, short chains: every test builds small, fast graphs
CFG = C.preset("imagenet", image_size=32, patch_sizes=(4, 8, 16, 32), k=2, t=2, self_mix=False)
N_SOLID = 13      # two ranks: shards of 6 and 7


def solid_colours(n):
    """``n`` distinct, well separated RGB colours."""
    return [((37 * i) % 256, (91 * i + 40) % 256, (173 * i + 90) % 256) for i in range(n)]


@pytest.fixture(scope="module")
def solid(tmp_path_factory):
    """Class folders of one-colour pictures, a distinct colour per file (the clean view of a sample
    tells which file it came from), and a mixing set of photographs."""
    root = tmp_path_factory.mktemp("solid")
    for i, rgb in enumerate(solid_colours(N_SOLID)):
        folder = root / "train" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + i, 48), rgb).save(folder / f"{i:02d}.png")
    (root / "mixing").mkdir()
    for i, pic in enumerate(photo_crops(48, 4, seed=3)):
        Image.fromarray(pic).save(root / "mixing" / f"m{i}.png")
    return root


def _loader(data, **kw):
    kw = {"cfg": CFG, "batch_size": 4, "num_threads": 1, "device": "cpu", **kw}
    return IPMixLoader(data / "train", data / "mixing", **kw)


def _file_of(view, cfg=CFG):
    """The index of the solid colour a normalised clean view [3, S, S] shows (None: not one colour);
    4-px borders left out (the CIFAR crop pads with up to 4 black pixels)."""
    view = view[:, 4:-4, 4:-4]
    pixels = (view.float() * torch.tensor(cfg.std).view(3, 1, 1) + torch.tensor(cfg.mean).view(3, 1, 1)) * 255
    if pixels.flatten(1).std(1).max() > 2:
        return None
    dist = (torch.tensor(solid_colours(N_SOLID), dtype=torch.float) - pixels.flatten(1).mean(1)).norm(dim=1)
    return int(dist.argmin()) if dist.min() < 4 else None


def _take(loader, n):
    out = []
    while len(out) < n:
        out += [(x.clone(), y.clone()) for x, y in loader][: n - len(out)]
    return out


def test_views_layouts_put_each_samples_views_where_they_say(solid):
    sm, vm = _take(_loader(solid), 2), _take(_loader(solid, views_layout="view_major"), 2)
    for (xs, ys), (xv, yv) in zip(sm, vm):
        b = ys.numel()
        assert xs.shape == xv.shape == (3 * b, 3, 32, 32) and torch.equal(ys, yv)
        # the same draws: view k of sample i is row 3i+k sample-major, row k*B+i view-major
        torch.testing.assert_close(xv.view(3, b, 3, 32, 32).transpose(0, 1), xs.view(b, 3, 3, 32, 32),
                                   rtol=0, atol=0)
        # the clean view comes first: one colour, the file's, whose folder is the label
        files = [_file_of(x) for x in xv[:b]]
        assert None not in files, files
        assert [f % 3 for f in files] == ys.tolist()
    assert any(_file_of(x) is None for _, (xv, yv) in zip(sm, vm) for x in xv[yv.numel():])


def _same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["sample_major", "view_major"])
def test_a_loaded_state_continues_with_the_exact_next_batch(solid, layout):
    # 13 images / batch 4 (drop) = 3 batches an epoch: stopping after 2 resumes mid-epoch and the
    # continuation crosses into the next epoch
    first = _loader(solid, views_layout=layout)
    assert len(first) == 3 and first.epoch_size == N_SOLID and first.classes == ["c0", "c1", "c2"]
    it = iter(first)
    [next(it) for _ in range(2)]
    state = first.state_dict()
    expected = [next(it)] + [(x.clone(), y.clone()) for x, y in first]
    resumed = _loader(solid, views_layout=layout)
    resumed.load_state_dict(state)
    got = [(x.clone(), y.clone()) for x, y in resumed] + [(x.clone(), y.clone()) for x, y in resumed]
    assert len(got) == 1 + 3
    _same_batches(got, expected)


def test_states_of_another_loader_are_refused_in_one_line(solid, dataset):
    state = _loader(solid).state_dict()
    cases = [
        (_loader(solid, batch_size=3), "batch_size"),
        (_loader(solid, rank=0, world_size=2), "world_size"),
        (IPMixLoader(dataset / "train", dataset / "mixing", cfg=CFG, batch_size=4, num_threads=1,
                     device="cpu"), "data set"),
        (_loader(solid, preset="cifar", cfg=C.CIFAR.replace(k=2, t=2)), "preset"),
    ]
    for loader, what in cases:
        with pytest.raises(ValueError, match=f"the state is of {what} ") as e:
            loader.load_state_dict(state)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not a state of this loader"):
        _loader(solid).load_state_dict({"positions": []})
    # a state taken on one rank without a process group holds that rank's position only
    half = _loader(solid, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="no position of rank 1"):
        _loader(solid, rank=1, world_size=2).load_state_dict(half)


@pytest.mark.parametrize("kw, match", [
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"batch_size": 7, "rank": 0, "world_size": 2}, "batch_size 7 is larger than a shard"),
    ({"views_layout": "views_first"}, "views_layout must be one of"),
    ({"last_batch": "keep"}, "last_batch must be one of"),
    ({"preset": "imagenet21k"}, "preset must be one of"),
    ({"rank": 2, "world_size": 2}, "rank must be in 0..1"),
    ({"rank": 0}, "give both or neither"),
    ({"device": "tpu"}, "device='tpu'"),
    ({"dtype": "bfloat16"}, "dtype must be"),
    ({"crop_scale": 1.5}, "crop_scale must be in"),
])
def test_bad_arguments_are_one_line_errors_naming_the_argument(solid, kw, match):
    with pytest.raises(ValueError, match=match) as e:
        _loader(solid, **kw)
    assert "\n" not in str(e.value)


def test_ranks_come_from_the_process_group_else_torchrun_else_one_process(monkeypatch):
    from dali_ipmix.ipmix_loader import resolve_device, resolve_ranks
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_ranks() == (0, 1, 0)
    assert resolve_ranks(1, 2) == (1, 2, 1)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_ranks() == (5, 8, 1)       # (the process group's case: the two-rank test)
    assert resolve_device("cpu", 1) == (torch.device("cpu"), "cpu", None)
    if not torch.cuda.is_available():
        assert resolve_device("auto", 1) == (torch.device("cpu"), "cpu", None)
        with pytest.raises(ValueError, match="device='cuda:0': no CUDA GPU"):
            resolve_device("cuda:0", 0)


def test_missing_folders_name_the_argument(solid, tmp_path):
    from dali_ipmix.errors import UserError
    with pytest.raises(UserError, match=r"^data .*no such folder"):
        IPMixLoader(tmp_path / "nope", solid / "mixing", batch_size=2)
    with pytest.raises(UserError, match=r"^mixing .*no such folder"):
        IPMixLoader(solid / "train", tmp_path / "nope", batch_size=2)


def test_validation_loader_sees_every_image_once(solid):
    val = IPMixValLoader(solid / "train", cfg=CFG, batch_size=5, num_threads=1, device="cpu")
    batches = [(x.clone(), y.clone()) for x, y in val]
    assert len(val) == 3 and [y.numel() for _, y in batches] == [5, 5, 3]
    files = [_file_of(x) for x, _ in batches for x in x]
    assert sorted(files) == list(range(N_SOLID))
    assert [f % 3 for f in files] == torch.cat([y for _, y in batches]).tolist()


# the script run by both ranks: epochs of the public loader, the file of every clean view
RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
import test_ipmix_loader as t
from pathlib import Path
root = Path(sys.argv[1])
loader = t._loader(root, last_batch="partial", batch_size=4, views_layout="view_major")
assert (loader.rank, loader.world_size) == (dist.get_rank(), 2)
epochs = []
for _ in range(2):
    seen = []
    for x, y in loader:
        b = y.numel()
        files = [t._file_of(v) for v in x[:b]]
        assert [f % 3 for f in files] == y.tolist(), (files, y)
        seen += files
    epochs.append(seen)
state = loader.state_dict()          # a collective: both ranks' positions
out = [None, None]
dist.all_gather_object(out, (len(loader), epochs, [p is not None for p in state["positions"]]))
if dist.get_rank() == 0:
    print("RESULT", repr(out))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_ranks_see_every_sample_once_per_epoch(solid):
    codes, outs = two_ranks(RANK_SCRIPT, str(solid), timeout=180)
    assert codes == [0, 0], outs
    line = next(line for line in outs[0].splitlines() if line.startswith("RESULT"))
    results = eval(line[len("RESULT "):])
    assert sorted(n for n, _, _ in results) == [2, 2]       # shards of 6 and 7, batch 4
    for epoch in range(2):
        seen = [f for _, epochs, _ in results for f in epochs[epoch]]
        assert sorted(seen) == list(range(N_SOLID)), seen
    assert all(known == [True, True] for _, _, known in results)


# ---------------------------------------------------------------------------------------------
# The loss beside timm's

@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_jsd_loss_equals_timms_jsd_cross_entropy_in_both_layouts(smoothing):
    from timm.loss import JsdCrossEntropy
    g = torch.Generator().manual_seed(0)
    b, classes = 6, 10
    per_sample = torch.randn(b, 3, classes, generator=g) * 4       # [sample, view, class]
    labels = torch.randint(0, classes, (b,), generator=g)
    view_major = per_sample.transpose(0, 1).reshape(3 * b, classes)
    timm_loss = JsdCrossEntropy(num_splits=3, alpha=12, smoothing=smoothing)(view_major, labels)
    ours_vm, clean_vm = ipmix_loss(view_major, labels, 3, jsd_weight=12, label_smoothing=smoothing,
                                   views_layout="view_major")
    ours_sm, clean_sm = ipmix_loss(per_sample.reshape(3 * b, classes), labels, 3, jsd_weight=12,
                                   label_smoothing=smoothing)
    torch.testing.assert_close(ours_vm, timm_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_sm, timm_loss, rtol=1e-6, atol=1e-6)
    assert torch.equal(clean_vm, per_sample[:, 0]) and torch.equal(clean_sm, per_sample[:, 0])
    # a layout read as the other one gives another loss (the test can tell them apart)
    wrong, _ = ipmix_loss(view_major, labels, 3, jsd_weight=12, label_smoothing=smoothing)
    assert not torch.allclose(wrong, timm_loss, rtol=1e-3)


def test_stopping_after_len_batches_then_a_new_loop_gives_the_next_epoch(solid, caplog):
    # Lightning takes len() batches and starts a new loop without exhausting the iterator
    whole = _loader(solid)
    expected = [(x.clone(), y.clone()) for _ in range(2) for x, y in whole]
    counted = _loader(solid)
    got = []
    for _ in range(2):
        batches = iter(counted)
        got += [tuple(t.clone() for t in next(batches)) for _ in range(len(counted))]
    _same_batches(got, expected)
    assert "does not support resetting" not in caplog.text
