"""What rank 0 shows of a run: progress bar, TensorBoard scalars, loss plot and run summary.

:class:`RunObserver` receives the training loop's hooks (see :mod:`launcher.observe`) and
hands each to the part that owns it. Every part is built so that a resumed run reads as one
continuous run: the bar starts at the resumed step, TensorBoard drops what the crashed
attempt logged past the checkpoint, and the plot and summary are drawn from the run's files,
which hold the whole history.

A failure to draw the plot or write the summary is logged, never raised: a full disk or a
broken font cache must not end a training run.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from launcher import plots, summary
from launcher.observe import Observer
from launcher.runfiles import scalars, worker_starts

log = logging.getLogger("launcher")
progress_log = logging.getLogger("launcher.progress")

TENSORBOARD = "tensorboard"
PLOT_TIME_SHARE = 100  # redraw at an epoch end only if this many plot durations passed since the last


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _AboveBar:
    """A stream that prints through ``tqdm.write``: above the bar instead of across it."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.rstrip("\n")
        if text:
            tqdm.write(text, file=self.stream)

    def flush(self) -> None:
        self.stream.flush()


def _has_size(stream: TextIO) -> bool:
    """False for a terminal that reports no size, where tqdm then needs a fixed one.

    A pseudo-terminal that was never given a size (``script``, some CI runners, ``docker run -t``
    before the first resize) reports 0 x 0, and tqdm would treat the bar as off-screen and draw
    nothing.
    """
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return True


class ProgressDisplay:
    """A tqdm bar on a terminal; otherwise a plain line every ``interval`` steps.

    The plain line keeps the loop's old wording (``step 10/120 epoch 1 loss ... lr ...``)
    and adds steps/s and ETA, so SLURM logs and ``grep`` keep working. On a terminal the
    same line still goes to the log file, and other log lines print above the bar instead
    of through it.
    """

    def __init__(self, total: int, start: int, interval: int, stream: TextIO | None = None,
                 terminal: bool | None = None):
        self.total, self.start, self.interval = total, start, interval
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self._t0 = time.time()
        self._mark = (start, self._t0)  # (step, time) of the last rate measurement
        self.last_rate: float | None = None
        self._bar: tqdm | None = None
        self._console: list[tuple[logging.StreamHandler, TextIO]] = []
        if self.terminal:
            self._print_above_bar()
            self._to_file_only()
            sized = _has_size(self.stream)
            self._bar = tqdm(total=total, initial=start, unit="step", file=self.stream, desc="train", smoothing=0.1,
                             dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24)

    def _print_above_bar(self) -> None:
        """Route console log lines through ``tqdm.write`` so they do not tear the bar.

        The handlers keep their level, format and filters; only their stream is wrapped.
        """
        for h in logging.getLogger().handlers:
            if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.stdout):
                self._console.append((h, h.setStream(_AboveBar(h.stream))))

    def _to_file_only(self) -> None:
        """On a terminal the bar is the console's progress; the plain lines go to the log files only."""
        progress_log.propagate = False
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.FileHandler):
                progress_log.addHandler(h)

    def update(self, record: dict[str, Any]) -> float | None:
        """Show step ``record``; return steps/s when a new rate was measured, else None."""
        step = record["step"]
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            post = {"loss": f"{record.get('loss', float('nan')):.4f}"}
            if "lr" in record:
                post["lr"] = f"{record['lr']:.3g}"
            self._bar.set_postfix(post, refresh=False)
        if not (step % self.interval == 0 or step == self.start + 1 or step == self.total):
            return None
        now = record.get("time", time.time())
        done_steps, done_time = step - self._mark[0], now - self._mark[1]
        self._mark = (step, now)
        rate = done_steps / done_time if done_time > 0 else None
        self.last_rate = rate
        average = (step - self.start) / max(now - self._t0, 1e-9)
        eta = _hms((self.total - step) / average) if average > 0 else "?"
        progress_log.info("step %d/%d epoch %s loss %.5f lr %.3g | %s steps/s, ETA %s", step, self.total,
                          record.get("epoch"), record.get("loss", float("nan")), record.get("lr", float("nan")),
                          f"{rate:.2f}" if rate else "?", eta)
        return rate

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for h, stream in self._console:
            h.setStream(stream)
        self._console = []
        for h in list(progress_log.handlers):
            progress_log.removeHandler(h)
        progress_log.propagate = True


class TensorBoardLog:
    """Scalars under ``RUN_DIR/tensorboard/``, continuing across resumes without duplicate steps.

    On every start the writer is opened with ``purge_step = start_step + 1``: TensorBoard
    then hides every event at or after that step from earlier event files, i.e. what the
    crashed attempt logged after the checkpoint this attempt resumed from (and, on a fresh
    start, everything a run that died before its first checkpoint logged).
    """

    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter  # late: imports tensorboard (a second or two)

        self.dir = Path(run_dir) / TENSORBOARD
        self.dir.mkdir(parents=True, exist_ok=True)
        self._after_existing_files()
        self.writer = SummaryWriter(str(self.dir), purge_step=start_step + 1 if start_step else 0, flush_secs=10)

    def _after_existing_files(self) -> None:
        """Wait, at most a second, until this attempt's event file sorts after the last one.

        Readers load event files in name order, and a name starts with its creation second.
        Two attempts in one second would sort by pid, and the crashed attempt's events read
        after this one's purge marker would look like new data.
        """
        newest = 0
        for p in self.dir.glob("events.out.tfevents.*"):
            try:
                newest = max(newest, int(p.name.split(".")[3]))
            except (IndexError, ValueError):
                continue
        while int(time.time()) <= newest and time.time() < newest + 2:
            time.sleep(0.05)

    def step(self, record: dict[str, Any]) -> None:
        for k, v in scalars(record).items():
            self.writer.add_scalar(k if "/" in k else f"train/{k}", v, record["step"])

    def evaluation(self, record: dict[str, Any]) -> None:
        for k, v in scalars(record).items():
            if "/" in k:
                tag = k
            elif k == "train_loss":
                tag = "train/epoch_loss"
            elif k.startswith("val_"):
                tag = f"val/{k[4:]}"
            else:
                tag = f"eval/{k}"
            self.writer.add_scalar(tag, v, record["step"])
        self.writer.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RunObserver(Observer):
    """Rank 0's observer: progress, TensorBoard, plot and summary (see the module docstring)."""

    def __init__(self, log_interval: int = 10, stream: TextIO | None = None, terminal: bool | None = None):
        self.log_interval = log_interval
        self.stream, self.terminal = stream, terminal
        self.progress: ProgressDisplay | None = None
        self.tb: TensorBoardLog | None = None
        self.run_dir: Path | None = None
        self._restarts_pending = False
        self._plot_seconds = 0.0  # how long the last plot took to draw
        self._plotted_at = float("-inf")  # when it was drawn (time.monotonic)

    #: The loop leaves per-step progress lines to this observer.
    reports_progress = True

    def on_start(self, run_dir: Path, start_step: int, total_steps: int, resumed: bool) -> None:
        self.run_dir = Path(run_dir)
        self.tb = TensorBoardLog(self.run_dir, start_step)
        self._restarts_pending = True
        self.progress = ProgressDisplay(total_steps, start_step, self.log_interval, self.stream, self.terminal)

    def on_step(self, record: dict[str, Any]) -> None:
        rate = self.progress.update(record)
        self.tb.step(record)
        if rate is not None:
            self.tb.scalar("perf/steps_per_sec", rate, record["step"])
        if self._restarts_pending:
            # Logged at the first step after the start, not at the start step: a purge at
            # start+1 then removes it along with the rest of a crashed attempt.
            self.tb.scalar("run/restarts", max(len(worker_starts(self.run_dir)) - 1, 0), record["step"])
            self._restarts_pending = False

    def on_eval(self, record: dict[str, Any]) -> None:
        self.tb.evaluation(record)
        # Redrawn at each epoch end, unless epochs are so short that drawing would take more
        # than a hundredth of the training time (a plot takes ~0.3-1 s, on rank 0, which every
        # other rank then waits for: the step loop's overhead budget is 0.5 ms); always at the end.
        if time.monotonic() - self._plotted_at >= PLOT_TIME_SHARE * self._plot_seconds:
            self._plot()

    def on_save(self, step: int, reason: str, seconds: float) -> None:
        self.tb.scalar("perf/checkpoint_save_seconds", seconds, step)
        self.tb.flush()

    def on_end(self, loop_summary: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.tb is not None:
            self.tb.flush()
        self._plot()
        try:
            result = summary.build(self.run_dir, loop_summary)
            summary.write(self.run_dir, result)
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("Could not write %s: %s", self.run_dir / summary.FILE, e)
            return
        log.info("%s\n  summary: %s", summary.format_text(result), self.run_dir / summary.FILE)

    def _plot(self) -> None:
        started = time.monotonic()
        try:
            path = plots.plot_run(self.run_dir)
        except Exception as e:
            log.warning("Could not draw the loss plot: %s: %s", type(e).__name__, e)
            return
        finally:
            self._plotted_at = time.monotonic()
            self._plot_seconds = self._plotted_at - started
        log.debug("Loss plot refreshed in %.2f s: %s", self._plot_seconds, path)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def for_rank(is_main: bool, log_interval: int) -> Observer:
    """The rich observer on rank 0, the silent base elsewhere."""
    return RunObserver(log_interval) if is_main else Observer()
