"""dali_ipmix/training's pieces one at a time, without a training run (train.py's end-to-end runs
are in test_train.py): the learning-rate schedules, the --preset cifar-adv recipe as train.py fills
it in, the run's frozen record of its flags, and a stop request that two gloo ranks agree on."""
import copy
import dataclasses
import os

import pytest

import train
from conftest import two_ranks
from dali_ipmix.sources import DataSource
from dali_ipmix.training import schedule
from dali_ipmix.training.state import RunState

# ---------------------------------------------------------------------------------------------
# Learning-rate schedules (training/schedule.py)

def test_lr_schedule_warmup_then_cosine_to_floor():
    lam = schedule.make_lr_lambda(total_steps=100, warmup_steps=10, min_factor=0.01)
    assert lam(0) == pytest.approx(0.1) and lam(9) == pytest.approx(1.0)
    assert lam(10) == pytest.approx(1.0) and lam(100) == pytest.approx(0.01)
    values = [lam(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_piecewise_schedule_is_rice_et_al():
    # locuslab/robust_overfitting train_cifar.py: lr_schedule(epoch + (i + 1) / n) before step i
    epochs, n = 8, 5
    rice = lambda t: 0.1 if t / epochs < 0.5 else 0.01 if t / epochs < 0.75 else 0.001   # noqa: E731
    lam = schedule.make_lr_lambda(epochs * n, 0, 1e-4, "piecewise")
    for epoch in range(epochs):
        for i in range(n):
            assert 0.1 * lam(epoch * n + i) == pytest.approx(rice(epoch + (i + 1) / n)), (epoch, i)


# ---------------------------------------------------------------------------------------------
# Recipes (training/recipes.py, filled in by train.resolve_flags)

def test_cifar_adv_preset_defaults_and_overrides():
    def resolved(*argv):
        return train.resolve_flags(train.get_args_parser().parse_args(["--data-path", "d", "--mixing-set",
                                                                       "m", *argv]))
    a = resolved("--preset", "cifar-adv")
    assert (a.preset, a.arch, a.epochs, a.batch_size, a.lr, a.lr_schedule, a.nesterov, a.wd, a.momentum) == (
        "cifar", "preactresnet18", 200, 128, 0.1, "piecewise", "off", 5e-4, 0.9)
    assert (a.adv_mixup, a.adv_eps, a.adv_step_size, a.adv_steps, a.no_jsd, a.adv_eval_every) == (
        "aom", 8 / 255, 2 / 255, 10, True, 1)
    b = resolved("--preset", "cifar-adv", "--epochs", "30", "--adv-mixup", "mixup_pgd", "--nesterov", "on")
    assert (b.epochs, b.adv_mixup, b.nesterov, b.lr_schedule) == (30, "mixup_pgd", "on", "piecewise")
    c = resolved()
    assert (c.preset, c.lr_schedule, c.nesterov, c.adv_mixup, c.adv_eval_every) == (
        "imagenet", "cosine", "on", "off", 0)


# ---------------------------------------------------------------------------------------------
# The run's record of its flags (training/run_config.py, resolved by train.py)

def test_resolving_the_flags_leaves_the_parsed_ones_alone_and_the_record_frozen(dataset, tmp_path):
    # each resolution step returns a new record: the Namespace argparse made stays as parsed, and
    # nothing assigns into the record once it is made
    args = train.get_args_parser().parse_args([
        "--data-path", str(dataset), "--mixing-set", str(dataset / "mixing"), "--preset", "cifar-adv",
        "--device", "cpu", "--batch-size", "4", "--output-dir", str(tmp_path / "run")])
    parsed = copy.deepcopy(vars(args))
    state = RunState()
    try:
        flags = train.resolve_flags(args)
        flags = train.resolve_device(flags, state)
        flags = train.resolve_backend(flags, state)
        flags, ckpt = train.prepare_run(flags, state)
    finally:
        state.release()
    assert vars(args) == parsed
    # what each step resolved is in the record it returned
    assert (flags.preset, flags.recipe, flags.arch, flags.epochs, flags.adv_mixup, flags.no_jsd) == (
        "cifar", "cifar-adv", "preactresnet18", 200, "aom", True)          # resolve_flags
    assert (flags.amp, flags.backend) == ("off", "fused")                    # resolve_device, _backend
    assert isinstance(flags.train_dir, DataSource) and flags.train_dir.size == 12   # prepare_run
    assert os.fspath(flags.val_dir) == f"{dataset}/val" and flags.mixing_set.size == 5
    assert ckpt is None and state.num_classes == 3
    for field, value in (("epochs", 1), ("train_dir", "elsewhere"), ("output_dir", None)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(flags, field, value)
    # checkpoints record the flags as before the record: a plain value under each flag's name
    recorded = state.recorded_args(flags)
    assert set(recorded) == set(parsed) | {"recipe"} | set(RunState.RECORDED)
    assert recorded["adv_lambda_box"] == list(flags.adv_lambda_box)     # a pair, as a JSON-able list
    assert (recorded["train_dir"], recorded["output_dir"], recorded["preset"]) == (
        f"{dataset}/train", str(tmp_path / "run"), "cifar")


# ---------------------------------------------------------------------------------------------
# Distributed (training/distributed.py, two gloo ranks)

@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step_and_names_it():
    # SIGINT reaches rank 1 only, after step 2: both ranks stop after the same later step and
    # both report SIGINT (the shell's exit code 130), not a SIGTERM they never saw
    script = ("import os, signal, torch.distributed as dist\n"
              "from dali_ipmix.training.distributed import StopRequest\n"
              "dist.init_process_group('gloo')\n"
              "stop = StopRequest(True)\n"
              "for step in range(1, 50):\n"
              "    if step == 2 and dist.get_rank() == 1:\n"
              "        os.kill(os.getpid(), signal.SIGINT)\n"
              "    if stop.should_stop():\n"
              "        break\n"
              "stop.close()\n"
              "print('stopped', step, stop.name(), flush=True)\n"
              "dist.destroy_process_group()\n")
    codes, outs = two_ranks(script)
    assert codes == [0, 0], outs
    last = [o.strip().splitlines()[-1] for o in outs]
    assert last[0] == last[1] == "stopped 3 SIGINT", outs
