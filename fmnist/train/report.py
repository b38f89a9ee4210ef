"""What a training run shows and leaves behind: the live console, history.csv, loss_curve.png."""

from __future__ import annotations

import csv
import io

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fmnist.core.run_layout import STOPPED_EARLY_COLUMN

HISTORY_COLUMNS = (
    "epoch", "train_loss", "test_loss", "test_accuracy", "train_seconds", "epoch_seconds", "samples_per_second",
)
VALIDATION_COLUMNS = ("val_loss", "val_accuracy")  # a run with --validation has these too


def _validated(history: list[dict]) -> bool:
    return bool(history) and "val_accuracy" in history[0]


def history_csv(history: list[dict]) -> str:
    out = io.StringIO()
    columns = (HISTORY_COLUMNS + VALIDATION_COLUMNS * _validated(history)
               + (STOPPED_EARLY_COLUMN,) * (bool(history) and STOPPED_EARLY_COLUMN in history[0]))
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def loss_curve_png(history: list[dict]) -> bytes:
    """Train vs test (and validation) loss, and test (and validation) accuracy, per epoch."""
    # Imported here, at the end of a run: Ray's training processes import this module, and
    # matplotlib is 0.4 s of each one's start.
    from matplotlib.figure import Figure  # not pyplot: no display, and no global backend switched for the caller
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4), layout="tight")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    loss_ax.plot(epochs, [r["test_loss"] for r in history], marker="o", label="test")
    if _validated(history):
        loss_ax.plot(epochs, [r["val_loss"] for r in history], marker="o", label="validation")
        acc_ax.plot(epochs, [100 * r["val_accuracy"] for r in history], marker="o", label="validation")
    loss_ax.set(title="Loss (NLL)", xlabel="epoch", ylabel="loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [100 * r["test_accuracy"] for r in history], marker="o", color="tab:green", label="test")
    acc_ax.set(title="Accuracy", xlabel="epoch", ylabel="%")
    acc_ax.legend()
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    return out.getvalue()


class TrainingConsole:
    """A progress bar for the epoch under way, and one printed table row per finished epoch."""

    def __init__(self, console: Console, epochs: int):
        self.console = console
        self.epochs = epochs
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("batches"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task = None
        self.header_shown = False

    def __enter__(self) -> "TrainingConsole":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def batch(self, epoch: int, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task("", total=total, epoch=epoch, epochs=self.epochs)
        self.progress.update(self.task, completed=done, total=total, epoch=epoch)

    def epoch_done(self, row: dict) -> None:
        table = Table(box=None, show_header=not self.header_shown, pad_edge=False)
        columns = [("epoch", 7), ("train loss", 10), ("test loss", 10), ("accuracy", 9)]
        cells = [f"{row['epoch']}/{self.epochs}", f"{row['train_loss']:.4f}", f"{row['test_loss']:.4f}",
                 f"{100 * row['test_accuracy']:.2f}%"]
        if "val_accuracy" in row:
            columns.append(("val accuracy", 12))
            cells.append(f"{100 * row['val_accuracy']:.2f}%")
        for name, width in (*columns, ("seconds", 8), ("samples/s", 10)):
            table.add_column(name, justify="right", min_width=width)
        table.add_row(*cells, f"{row['epoch_seconds']:.1f}", f"{row['samples_per_second']:,.0f}")
        self.header_shown = True
        self.progress.console.print(table)
        if self.task is not None:
            self.progress.update(self.task, completed=0)
