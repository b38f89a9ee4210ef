"""The driver's side of a run's progress: each event rank 0 sends drawn, and each epoch written to the run's files."""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from fmnist.core.run_layout import HISTORY_FILE
from fmnist.core.signals import sigint_held
from fmnist.core.storage import StoragePath
from fmnist.core.tracking import TrainingTracker
from fmnist.train.report import TrainingConsole, history_csv


class RunFiles:
    """What the driver does with each event rank 0 sends: draws the progress, and as an epoch ends
    writes history.csv, tracks the figures and tells ``on_epoch`` (a search's trial reports to Tune)."""

    def __init__(self, view: TrainingConsole, run_dir: StoragePath, tracker: TrainingTracker, called_at: float,
                 on_epoch: Callable[[dict], None] | None):
        self.view, self.run_dir, self.tracker, self.called_at, self.on_epoch = view, run_dir, tracker, called_at, on_epoch
        self.history: list[dict] = []
        self.startup_seconds: float | None = None

    def put_nowait(self, event: tuple) -> None:
        """One event (as a queue takes it: local mode's loop calls this directly, on the thread where
        Ctrl-C lands, which then waits for the event's files to be written)."""
        with sigint_held():
            self._handle(event)

    def _handle(self, event: tuple) -> None:
        if event[0] == "batch":
            self.view.batch(*event[1:])
            return
        _, row, self.history = event
        if self.startup_seconds is None:
            self.startup_seconds = time.perf_counter() - self.called_at - row["epoch_seconds"]
        self.view.epoch_done(row)
        self.run_dir.write(HISTORY_FILE, history_csv(self.history).encode())
        self.tracker.epochs(self.history)
        if self.on_epoch:
            self.on_epoch(row)


class ProgressDrawer(threading.Thread):
    """Hands the events of a Ray queue to ``RunFiles`` beside fit(), which keeps the calling thread
    (the main one on the command line, where Ctrl-C lands). A failure to write the run's files is
    kept for the caller, and stops the run with ``abort_run`` where there is one."""

    def __init__(self, progress, files: RunFiles, abort_run: Callable[[], None] | None):
        super().__init__(daemon=True)
        self.progress, self.files, self.abort_run = progress, files, abort_run
        self.error: BaseException | None = None
        self._fit_returned = threading.Event()

    def run(self) -> None:
        while not (self._fit_returned.is_set() and self.progress.empty()):
            try:
                event = self.progress.get(timeout=0.2)
            except queue.Empty:  # ray.util.queue.Empty is one
                continue
            if self.error is None:
                try:
                    self.files.put_nowait(event)
                except BaseException as e:
                    self.error = e
                    if self.abort_run:
                        self.abort_run()

    def finish(self) -> None:
        """Returns once every event the run sent is handled: Ray may then shut down."""
        self._fit_returned.set()
        self.join()
