"""Show an Evaluation to a person: a rich console report, and a confusion-matrix heatmap PNG."""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fmnist.evaluate.metrics import Evaluation, write_report_file

# Off-diagonal cells at least this share of their row (true class) stand out in the table.
NOTABLE_SHARE, SEVERE_SHARE = 0.01, 0.05


def print_report(evaluation: Evaluation, console: Console, confused_pairs: int = 5) -> None:
    """Header, classification report, confusion matrix and the most-confused class pairs."""
    console.print(_header(evaluation))
    console.print(_classification_table(evaluation))
    console.print(_confusion_table(evaluation, console))
    if evaluation.correct < evaluation.n:
        console.print(_confused_pairs_table(evaluation, confused_pairs))


def _header(e: Evaluation) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("Predictions", e.source)
    grid.add_row("Model", e.checkpoint or Text("not recorded in the predictions", style="dim"))
    rows = f"{e.n:,}"
    if e.unlabeled:
        rows += f"  ({e.unlabeled:,} {'row' if e.unlabeled == 1 else 'rows'} without a label not counted)"
    grid.add_row("Rows", rows)
    grid.add_row("Accuracy", Text.assemble(
        (f"{e.accuracy:.2%}", "bold " + _score_style(e.accuracy)),
        f"  {e.correct:,} correct, {e.n - e.correct:,} wrong",
    ))
    return Panel(grid, title="[bold]Fashion-MNIST evaluation", title_align="left", expand=False)


def _score_style(value: float) -> str:
    return "green" if value >= 0.9 else "yellow" if value >= 0.75 else "red"


def _classification_table(e: Evaluation) -> Table:
    table = Table(title="Classification report", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("Class")
    for name in ("Precision", "Recall", "F1", "Support"):
        table.add_column(name, justify="right")
    for name, p, r, f, s in zip(e.class_names, e.precision, e.recall, e.f1, e.support):
        table.add_row(name, f"{p:.3f}", f"{r:.3f}", Text(f"{f:.3f}", style=_score_style(f)), f"{s:,}",
                      style="dim" if s == 0 else None)
    table.add_section()
    for name, avg in (("macro avg", e.macro_avg), ("weighted avg", e.weighted_avg)):
        table.add_row(name, f"{avg['precision']:.3f}", f"{avg['recall']:.3f}", f"{avg['f1']:.3f}",
                      f"{avg['support']:,}", style="bold")
    return table


def _confusion_table(e: Evaluation, console: Console) -> Table:
    """Class names as column headers where they fit the console, else class numbers."""
    table = _confusion_table_headed(e, e.class_names, e.class_names)
    # Measured unconstrained: rich would squeeze the table into the console width otherwise.
    if console.measure(table, options=console.options.update_width(10_000)).maximum > console.width:
        numbers = [str(i) for i in range(len(e.class_names))]
        table = _confusion_table_headed(e, numbers, [f"{i} {name}" for i, name in enumerate(e.class_names)])
    return table


def _confusion_table_headed(e: Evaluation, columns: Sequence[str], rows: Sequence[str]) -> Table:
    table = Table(title="Confusion matrix (rows: true class, columns: predicted)", title_justify="left",
                  box=box.SIMPLE_HEAD)
    table.add_column("true \\ predicted", style="bold", no_wrap=True)
    for name in columns:
        table.add_column(name, justify="right", no_wrap=True)
    for i, (name, row) in enumerate(zip(rows, e.confusion)):
        table.add_row(name, *(_confusion_cell(i, j, int(count), int(row.sum())) for j, count in enumerate(row)))
    return table


def _confusion_cell(true: int, predicted: int, count: int, row_total: int) -> Text:
    if true == predicted:
        return Text(f"{count:,}", style="bold green")
    share = count / row_total if row_total else 0.0
    style = "bold red" if share >= SEVERE_SHARE else "yellow" if share >= NOTABLE_SHARE else "dim"
    return Text(f"{count:,}", style=style)


def _confused_pairs_table(e: Evaluation, limit: int) -> Table:
    wrong = e.n - e.correct
    table = Table(title="Most confused classes", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("A vs B")
    for name in ("Mistakes", "of all mistakes", "A as B", "B as A"):
        table.add_column(name, justify="right")
    for pair in e.most_confused(limit):
        # The larger direction first: in "Shirt vs T-shirt/top", shirts are mistaken the most.
        a, b, a_as_b, b_as_a = pair if pair.a_as_b >= pair.b_as_a else (pair.b, pair.a, pair.b_as_a, pair.a_as_b)
        table.add_row(f"{e.class_names[a]} vs {e.class_names[b]}", f"{pair.total:,}", f"{pair.total / wrong:.1%}",
                      f"{a_as_b:,}", f"{b_as_a:,}")
    return table


def plot_confusion_matrix(evaluation: Evaluation, path: str | os.PathLike) -> None:
    """Write the confusion matrix as a PNG heatmap: colour = share of the true class, text = count."""
    # Not pyplot: no display, and no global backend switched for the caller.
    from matplotlib.figure import Figure

    e = evaluation
    counts = e.confusion
    support = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, support, out=np.zeros(counts.shape), where=support > 0)

    fig = Figure(figsize=(9, 8), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    ticks = range(len(e.class_names))
    ax.set_xticks(ticks, e.class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, e.class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix: accuracy {e.accuracy:.2%} on {e.n:,} images")
    for (i, j), count in np.ndenumerate(counts):
        if count:
            ax.text(j, i, f"{count:,}", ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    write_report_file(path, png.getvalue(), "--plot")
