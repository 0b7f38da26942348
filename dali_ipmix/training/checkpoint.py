"""What a run keeps in its output folder, and how: checkpoints written atomically (a failed write
leaves the previous one) and pruned by step, loaded and checked for ``--resume``; the folder's
lock against a second run; an earlier run's files, which need ``--resume auto`` or ``--overwrite``
(README "Training": Checkpoints; README "Faults"; docs/reliability.md)."""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..errors import UserError
from ..outputs import atomic_file
from .run_config import RunConfig

# What a run writes into its output folder (previous_run_files lists an earlier run's).
CKPT_PATTERN = re.compile(r"^checkpoint_(\d+)\.pth$")
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
BEST_ROBUST = "best_robust.pth"
LOCK_FILE = ".train.lock"


def find_checkpoints(folder):
    """[(step, path)] sorted by step."""
    out = []
    for path in glob.glob(os.path.join(str(folder), "checkpoint_*.pth")):
        m = CKPT_PATTERN.match(os.path.basename(path))
        if m:
            out.append((int(m.group(1)), path))
    return sorted(out)


class _KeepWriteError:
    """A file whose failed write is remembered: torch.save swallows the OSError of a full disk and
    raises ``RuntimeError: unexpected pos`` instead, which must not pass for a bug."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def atomic_torch_save(obj, path):
    """torch.save through ``outputs.atomic_file`` (durable): a failed write raises OSError (disk
    full, quota, permissions) and leaves no temporary file."""
    with atomic_file(path, durable=True) as f:
        sink = _KeepWriteError(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None


def write_checkpoint(ckpt: dict, folder, step: int, keep: int, failed):
    """Save ``checkpoint_<step>.pth`` and delete all but the newest ``keep``; returns its path, or
    None when the write failed (warned and remembered in ``failed``, a metrics.FailedWrites; the
    run goes on)."""
    path = os.path.join(folder, f"checkpoint_{step:08d}.pth")
    try:
        atomic_torch_save(ckpt, path)
    except OSError as e:
        # disk full, permissions, quota: the run goes on, older checkpoints stay as they are
        kept = find_checkpoints(folder)
        print(f"train.py: warning: writing checkpoint {path} failed ({e.strerror or e}); "
              f"{'previous checkpoint ' + kept[-1][1] if kept else 'no earlier checkpoint'} kept; "
              f"the next checkpoint tries again", file=sys.stderr, flush=True)
        failed.add(os.path.basename(path), e)
        return None
    for _, old in find_checkpoints(folder)[:-max(1, keep)]:
        try:
            os.unlink(old)
        except OSError:
            pass
    return path


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, device: torch.device):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# The output folder

def prepare_output_dir(flags: RunConfig, state) -> Tuple[str, Optional[str]]:
    """Choose (``runs/<arch>-<time>`` by default), create and lock ``--output-dir``; refuse an
    earlier run's files unless ``--resume`` or ``--overwrite``; turn ``--resume auto`` into the
    newest checkpoint.  Rank 0 only; ``state`` is the RunState (lock, files to delete).  Returns
    (the output folder, the checkpoint to resume or None)."""
    output_dir, resume = flags.output_dir, flags.resume
    if output_dir is None:
        if resume not in (None, "auto"):
            output_dir = os.path.dirname(os.path.abspath(resume))
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            output_dir = os.path.join("runs", f"{'demo-' if state.demo else ''}{flags.arch}-{stamp}")
    out = Path(output_dir)
    state.made_output_dir = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise UserError(f"--output-dir {out} is not writable ({e.strerror or e})") from None
    state.output_lock = lock_output_dir(out)
    existing = find_checkpoints(out)
    state.previous_run = previous_run_files(out) if resume is None else []
    if state.previous_run and not flags.overwrite:
        what = (f"{len(existing)} checkpoint(s)" if existing else
                ", ".join(os.path.basename(p) for p in state.previous_run))
        raise UserError(f"--output-dir {out} already holds {what} of another run; pass --resume auto "
                        f"to continue it, --overwrite to start afresh (deletes that run's files), "
                        f"or another --output-dir")
    if resume == "auto":
        if not existing:
            raise UserError(f"--resume auto: no checkpoint_*.pth in {out}")
        resume = existing[-1][1]
    return output_dir, resume


def lock_output_dir(out):
    """Hold an exclusive lock on ``out`` while this run lives, so a second run into the same folder
    is refused instead of interleaving checkpoints and metrics.  flock: the kernel drops the lock
    when the process ends, however it ends, so a crashed run leaves no stale lock.  Returns the
    open lock file to keep (None where the file system has no locks)."""
    import fcntl
    f = open(os.path.join(str(out), LOCK_FILE), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read(200).strip() or "pid unknown"
        f.close()
        raise UserError(f"--output-dir {out} is in use by another train.py run ({holder}); wait for "
                        f"it to end (or stop it), or choose another --output-dir") from None
    except OSError as e:
        f.close()
        print(f"train.py: warning: cannot lock --output-dir {out} ({e.strerror or e}); a second run "
              f"into it would not be refused", file=sys.stderr, flush=True)
        return None
    return f


def sign_lock(lock) -> None:
    """Write this run's pid, host and start into the held lock file (what a refused second run
    names).  Called once the run is going to train: a ``--resume`` of a finished run holds the
    lock only to read, and leaves the folder exactly as it found it."""
    if lock is None:
        return
    import socket
    lock.seek(0)
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()


def previous_run_files(out):
    """What an earlier run wrote into ``out`` (checkpoints, their temp files, metrics, summary,
    TensorBoard events, the best robust checkpoint): the files ``--overwrite`` deletes and whose
    presence needs a decision."""
    names = [p for _, p in find_checkpoints(out)]
    names += glob.glob(os.path.join(str(out), ".tmp-checkpoint_*"))
    names += [os.path.join(str(out), n) for n in (METRICS_FILE, SUMMARY_FILE, TENSORBOARD_DIR,
                                                  BEST_ROBUST)
              if os.path.lexists(os.path.join(str(out), n))]
    return names


def delete_previous_run(paths, folder, log):
    """--overwrite: remove the earlier run's files, after every check passed and the lock is held,
    so that pruning, ``--resume auto`` and metrics.jsonl only ever see this state."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    if paths:
        log(f"--overwrite: deleted the previous run's files in {folder}: "
            f"{', '.join(sorted(os.path.basename(p) for p in paths))}")


class RunComplete(Exception):
    """``--resume`` of a run that has nothing left to do: said in one line, exit 0, no file touched."""


def check_not_complete(flags: RunConfig, ckpt):
    """Raise RunComplete when ``ckpt`` ends the run ``flags`` describe: its last epoch is done
    (validated), or it is at --max-steps."""
    if ckpt is None:
        return
    step, epoch = ckpt.get("step", 0), ckpt.get("epoch", 0)
    done = ckpt.get("epoch_done", True) and epoch >= flags.epochs
    if done or (flags.max_steps and step >= flags.max_steps):
        what = (f"all {flags.epochs} epochs are done" if done else f"it is at --max-steps {flags.max_steps}")
        longer = ("pass a larger --epochs (the lr schedule then spans the new length, so the lr rises "
                  "again)" if done else "pass a larger --max-steps")
        raise RunComplete(f"--resume {flags.resume}: the run is complete ({what}, step {step}); nothing "
                          f"was changed in {flags.output_dir}. To train longer, {longer}; to start "
                          f"afresh, --overwrite or another --output-dir")


def load_resume_checkpoint(flags: RunConfig, num_classes: int):
    """The ``--resume`` checkpoint (None without one), refused with one line when it is not a
    train.py checkpoint or does not fit this run (architecture, classes, batch size)."""
    if flags.resume is None:
        return None
    if not os.path.isfile(flags.resume):
        raise UserError(f"--resume {flags.resume}: no such file")
    try:
        ckpt = torch.load(flags.resume, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"--resume {flags.resume}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise UserError(f"--resume {flags.resume}: not a train.py checkpoint (no model/arch entries)")
    if ckpt["arch"] != flags.arch:
        raise UserError(f"--resume {flags.resume}: checkpoint of --arch {ckpt['arch']}, but this run "
                        f"uses --arch {flags.arch}; pass --arch {ckpt['arch']}")
    recorded = ckpt.get("args", {})
    if recorded.get("num_classes", num_classes) != num_classes:
        raise UserError(f"--resume {flags.resume}: checkpoint of a {recorded['num_classes']}-class model, "
                        f"but {flags.train_dir} has {num_classes} classes; resume with the data it "
                        f"was trained on, or start a new run")
    if recorded.get("batch_size", flags.batch_size) != flags.batch_size:
        raise UserError(f"--resume {flags.resume}: checkpoint trained with --batch-size "
                        f"{recorded['batch_size']}, this run has {flags.batch_size}; pass --batch-size "
                        f"{recorded['batch_size']} (the schedule's length and the data position depend on it)")
    return ckpt
