"""What a run reports: metrics.jsonl and TensorBoard scalars (a full disk delays records, it does
not lose or tear them), the progress line every ``--print-freq`` steps, top-k accuracy, the writes
that failed, and the end-of-run summary (README "Training": Logs; README "Faults").  Only rank 0
writes and prints; the numbers are reduced over every rank first."""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time

import torch

from .. import advmixup
from ..errors import UserError
from ..outputs import write_atomic
from .checkpoint import BEST_ROBUST, METRICS_FILE, SUMMARY_FILE, TENSORBOARD_DIR
from .distributed import all_reduce_sum
from .run_config import RunConfig


def fmt_time(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0, seconds))))


class FailedWrites(list):
    """The writes that failed while the run went on, for the summary."""

    def add(self, what: str, error):
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        self.append(f"{what} ({reason})")

    def lines(self):
        return [f"  failed write: {w}" + (f" x{self.count(w)}" if self.count(w) > 1 else "")
                for w in dict.fromkeys(self)]


class MetricsWriter:
    """metrics.jsonl (+ TensorBoard scalars when available); writes only where ``enabled`` (rank 0).

    Records are appended as whole lines with os.write; when a write fails (disk full) the unwritten
    bytes stay queued (up to MAX_QUEUED) and go out with the next record, so the file keeps whole
    lines in order and loses nothing once space returns."""

    MAX_QUEUED = 16 << 20

    def __init__(self, folder, *, enabled: bool, tensorboard: bool, failed: FailedWrites):
        self.enabled, self.failed = enabled, failed
        self.fd, self.tb = None, None
        self.queued, self.failing, self.failures, self.dropped = b"", None, 0, 0
        if not self.enabled:
            return
        self.path = os.path.join(folder, METRICS_FILE)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(folder, TENSORBOARD_DIR))
            except Exception as e:  # tensorboard is an optional dependency
                print(f"note: TensorBoard logging skipped ({type(e).__name__}: {e}); metrics go to "
                      f"{METRICS_FILE} only", flush=True)

    def write(self, record: dict, step: int):
        if not self.enabled:
            return
        line = (json.dumps(record) + "\n").encode()
        if len(self.queued) + len(line) <= self.MAX_QUEUED:
            self.queued += line
        else:
            self.dropped += 1
        self._flush()
        if self.tb is not None:
            prefix = record.get("kind", "train")
            try:
                for key, value in record.items():
                    if key not in ("kind", "step", "epoch") and isinstance(value, (int, float)):
                        self.tb.add_scalar(f"{prefix}/{key}", value, step)
            except Exception as e:  # its writer thread hits the full disk first, raises here later
                print(f"train.py: warning: TensorBoard logging stopped ({type(e).__name__}: {e}); "
                      f"{METRICS_FILE} goes on", file=sys.stderr, flush=True)
                self.failed.add(TENSORBOARD_DIR, e)
                self.tb = None

    def _flush(self):
        while self.queued:
            try:
                self.queued = self.queued[os.write(self.fd, self.queued):]
            except OSError as e:
                self.failures += 1
                if self.failing is None:
                    print(f"train.py: warning: writing {self.path} failed ({e.strerror or e}); its "
                          f"records wait in memory and are written with the next one that fits",
                          file=sys.stderr, flush=True)
                self.failing = e
                return
        if self.failing is not None:
            print(f"train.py: {self.path} is written again; "
                  + (f"{self.dropped} record(s) did not fit in memory" if self.dropped else "no record lost"),
                  flush=True)
            self.failing = None

    def close(self):
        if self.fd is not None:
            self._flush()
            os.close(self.fd)
            self.fd = None
            if self.failures or self.dropped:
                lost = self.queued.count(b"\n") + self.dropped
                self.failed.add(METRICS_FILE, f"{self.failures} failed write(s), "
                                + (f"{lost} record(s) lost" if lost else "every record written later"))
        if self.tb is not None:
            try:
                self.tb.close()
            except Exception as e:
                self.failed.add(TENSORBOARD_DIR, e)


def topk_correct(logits, labels, ks):
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(labels.view(-1, 1))
    return [hit[:, :min(k, maxk)].any(dim=1).sum().item() for k in ks]


class StepWindow:
    """Training's log line and step records: a window of steps since the last line, kept on the
    device (one host sync per window) and reduced over ranks when its line is due; and the
    training images and seconds of all windows, for the summary's throughput.  A log line per
    window (printed as is, also into logs), not a progress line (``dali_ipmix.progress``)."""

    def __init__(self, writer: MetricsWriter, *, epochs: int, end_step: int, world_size: int,
                 device, is_main: bool):
        self.writer, self.epochs, self.end_step = writer, epochs, end_step
        self.world_size, self.device, self.is_main = world_size, device, is_main
        self.images, self.seconds = 0.0, 0.0
        self._restart()

    def _restart(self):
        self._t0, self._data, self._losses, self._correct, self._seen = time.perf_counter(), 0.0, [], 0.0, 0

    def start_epoch(self):
        self._restart()
        self._t_data = time.perf_counter()

    def batch_arrived(self):
        self._data += time.perf_counter() - self._t_data

    def next_batch(self):
        self._t_data = time.perf_counter()

    def add(self, step: int, loss: torch.Tensor, correct, seen: int):
        self._losses.append((step, loss))
        self._correct += correct
        self._seen += seen

    def report(self, epoch: int, step: int, lr: float):
        """Reduce the window over ranks, print one progress line, write its step records; a new
        window starts.  A collective: every rank calls it after the same steps."""
        if not self._losses:
            return
        n = len(self._losses)
        elapsed = time.perf_counter() - self._t0
        losses = torch.stack([l for _, l in self._losses]).float().cpu()  # one sync per window
        c1 = float(self._correct) if torch.is_tensor(self._correct) else self._correct
        loss_sum, c1, seen, data_t, el = all_reduce_sum(
            [float(losses.sum()), c1, self._seen, self._data, elapsed], self.device)
        self.images += seen
        self.seconds += el / self.world_size
        img_s = seen / max(el / self.world_size, 1e-9)
        data_share = data_t / max(el, 1e-9)
        step_time = (el / self.world_size) / max(n, 1)
        eta = step_time * max(0, self.end_step - step)
        mean_loss = loss_sum / (n * self.world_size)
        if not math.isfinite(mean_loss):
            raise UserError(f"the training loss became {mean_loss} by step {step} (diverged); the last good "
                            f"checkpoint is kept: lower --lr (now {lr:g}) or add --warmup-epochs, then "
                            f"--resume or start afresh")
        if self.is_main:
            for s, l in zip([s for s, _ in self._losses], losses.tolist()):
                self.writer.write({"kind": "step", "epoch": epoch + 1, "step": s, "loss": l}, s)
            self.writer.write({"kind": "train", "epoch": epoch + 1, "step": step, "loss": mean_loss,
                               "top1_clean": 100.0 * c1 / max(seen, 1), "lr": lr, "img_per_s": img_s,
                               "data_wait": data_share}, step)
            print(f"epoch {epoch + 1}/{self.epochs} step {step}/{self.end_step}  loss {mean_loss:.4f}  "
                  f"train top-1 {100.0 * c1 / max(seen, 1):.1f}%  lr {lr:.4g}  {img_s:.1f} img/s  "
                  f"data wait {100 * data_share:.0f}%  ETA {fmt_time(eta)}", flush=True)
        self._restart()


def best_robust(history):
    """The epoch record with the highest PGD accuracy of the per-epoch check (the first if tied)."""
    checked = [h for h in history if h.get("robust_pgd") is not None]
    return max(checked, key=lambda h: h["robust_pgd"]) if checked else None


def print_summary(flags: RunConfig, state, views, progress, setup_time, total, extra_lines=()):
    """The end of a run: accuracy, throughput, time, robust numbers, where the results are and
    which writes failed, printed and written to summary.json (rank 0)."""
    img_s = progress.images / progress.seconds if progress.seconds else 0.0
    epochs_done = [h for h in state.history if h.get("kind") == "epoch"]
    last = epochs_done[-1] if epochs_done else None
    best = best_robust(state.history)
    robust_evals = [h for h in state.history if h.get("kind") == "robust"]
    lines = [
        "=" * 72,
        f"summary: {flags.arch}{' (demo)' if state.demo else ''}, {state.step} steps, "
        f"{state.world_size} rank(s) x batch {flags.batch_size} ({views} view(s) each)",
        f"  val top-1: last {last['val_top1']:.2f}%  best {state.best_top1:.2f}%  (chance "
        f"{100.0 / state.num_classes:.1f}%)  top-5 last {last['val_top5']:.2f}%" if last else
        "  val top-1: (no completed epoch)",
        f"  throughput: {img_s:.1f} source img/s ({img_s * views:.1f} views/s) while training",
        f"  time: {fmt_time(total)} total ({total:.1f} s; setup {setup_time:.1f} s, "
        f"training {progress.seconds:.1f} s)",
        *([f"  best robust (PGD-{advmixup.SELECT_STEPS}, {flags.adv_eval_eps * 255:g}/255, "
           f"{best['robust_images']} val images): {best['robust_pgd']:.2f}% (clean {best['robust_clean']:.2f}%) "
           f"after epoch {best['epoch']} -> {os.path.join(flags.output_dir, BEST_ROBUST)}"]
          if best else []),
        *[f"  robust ({r['eps'] * 255:g}/255): clean {r['clean']:.2f}%  PGD-{r['steps']} {r['pgd']:.2f}%"
          + (f"  AutoAttack {r['autoattack']:.2f}%" if r.get('autoattack') is not None else "")
          + f"  ({r['images']} images)" for r in robust_evals],
        f"  checkpoint: {state.last_checkpoint}" if state.last_checkpoint else "  checkpoint: none",
        *([f"  checkpoint of step {state.step}: NOT WRITTEN (see the failed writes)"]
          if state.checkpoint_failed else []),
        f"  metrics: {os.path.join(flags.output_dir, METRICS_FILE)}",
        *extra_lines,
    ]
    summary = {"arch": flags.arch, "steps": state.step, "best_top1": state.best_top1, "last": last,
               "img_per_s": img_s, "seconds": total, "robust": robust_evals, "best_robust": best,
               "checkpoint": state.last_checkpoint, "final_checkpoint_written": not state.checkpoint_failed}
    try:
        write_atomic(os.path.join(flags.output_dir, SUMMARY_FILE),
                     json.dumps(dict(summary, failed_writes=state.failed_writes)))
    except OSError as e:
        state.failed_writes.add(SUMMARY_FILE, e)
    print("\n".join(lines + state.failed_writes.lines() + ["=" * 72]), flush=True)
