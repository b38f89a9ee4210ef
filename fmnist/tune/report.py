"""What a search shows and leaves behind: the live view of its trials, and the leaderboard."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from ray.tune import Callback
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fmnist.core import ray_compat
from fmnist.core.configs import augmentations_text

RECIPE_COLUMNS = ("hidden", "activation", "lr", "batch_size", "dropout", "weight_decay", "label_smoothing",
                  "schedule", "augment", "early_stopping")
LEADERBOARD_COLUMNS = ("rank", "trial", "status", "epochs", "val_accuracy", "best_epoch", *RECIPE_COLUMNS,
                       "run_dir", "error")
SHOWN_TRIALS = 12  # rows of the live table: the running trials first, then the best


@dataclass
class TrialRow:
    """One trial as the search sees it."""

    trial: str
    recipe: dict
    status: str = "pending"  # running, finished, stopped early, failed, pending (not yet started or interrupted)
    epochs: int = 0  # epochs reached
    val_accuracy: float | None = None  # the best of its epochs: its best checkpoint's
    best_epoch: int | None = None
    run_dir: str = ""
    error: str = ""

    def cells(self, rank: int) -> dict:
        hidden = self.recipe.get("hidden")
        return {
            "rank": rank, "trial": self.trial, "status": self.status, "epochs": self.epochs,
            "val_accuracy": "" if self.val_accuracy is None else f"{self.val_accuracy:.4f}",
            "best_epoch": self.best_epoch or "", "run_dir": self.run_dir, "error": self.error,
            **{k: self.recipe.get(k, "") for k in RECIPE_COLUMNS},
            "hidden": ",".join(map(str, hidden)) if hidden else "",
            "augment": augmentations_text(self.recipe["augment"]) if "augment" in self.recipe else "",
        }


def ranked(rows: list[TrialRow]) -> list[TrialRow]:
    """Best validation accuracy first; trials without one (failed, not started) last."""
    return sorted(rows, key=lambda r: (r.val_accuracy is None, -(r.val_accuracy or 0), r.trial))


def leaderboard_csv(rows: list[TrialRow]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=LEADERBOARD_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(row.cells(rank) for rank, row in enumerate(ranked(rows), 1))
    return out.getvalue()


def recipe_text(recipe: dict) -> str:
    """A recipe in one short line: 256,128,64 relu lr=0.002 batch=200 ..."""
    parts = []
    for key in RECIPE_COLUMNS:
        if key not in recipe:
            continue
        value = recipe[key]
        if key == "hidden":
            parts.append(",".join(map(str, value)))
        elif key in ("activation", "schedule"):
            parts.append(str(value))
        elif key == "augment":
            parts.append(f"augment={augmentations_text(value)}")
        elif key == "early_stopping":
            parts.append(f"early_stopping={value}")
        else:
            parts.append(f"{ {'batch_size': 'batch', 'weight_decay': 'wd', 'label_smoothing': 'ls'}.get(key, key)}"
                         f"={value:g}")
    return " ".join(parts)


def trials_table(rows: list[TrialRow], max_epochs: int, title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for name, justify in (("#", "right"), ("trial", "left"), ("status", "left"), ("epochs", "right"),
                          ("val accuracy", "right"), ("recipe", "left")):
        table.add_column(name, justify=justify)
    colour = {"running": "cyan", "finished": "green", "stopped early": "yellow", "failed": "red"}
    for rank, row in enumerate(rows, 1):
        accuracy = "" if row.val_accuracy is None else f"{100 * row.val_accuracy:.2f}%"
        detail = recipe_text(row.recipe) + (f"  [red]{row.error}[/]" if row.error else "")
        table.add_row(str(rank), row.trial, f"[{colour.get(row.status, 'dim')}]{row.status}[/]",
                      f"{row.epochs}/{max_epochs}", accuracy, detail)
    return table


@dataclass(eq=False)  # compared, and hashed, as the one object it is
class SearchView(Callback):
    """A Ray Tune callback drawing one live view of the search: counts by status, the leader, the trials.

    Tune saves its callbacks with the search; a restored search draws on the view of the process
    that restores it (ray_compat.restored_by_tune_as).
    """

    console: Console
    max_epochs: int
    trials: int
    recipe_of: object  # Tune's sample -> the trial's recipe
    rows: dict[str, TrialRow] = field(default_factory=dict)
    live: Live | None = None
    ended_trials: list = field(default_factory=list)  # Tune's trials as the search ended
    # Trials running in this process, until Tune sees them end. A Ctrl-C makes Tune mark the trials it
    # was running TERMINATED as it stops them, though they did not end (its saved state keeps them
    # running, so that a resume continues them): those still here at the end were interrupted.
    running: set[str] = field(default_factory=set)

    def __post_init__(self):
        super().__init__()

    def __reduce__(self):
        return ray_compat.restored_by_tune_as(_current_view)

    def __enter__(self) -> "SearchView":
        global _view
        _view = self
        self.live = Live(self._render(), console=self.console, refresh_per_second=2, transient=True)
        self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        global _view
        self.live.stop()
        _view = None

    def _row(self, trial) -> TrialRow:
        if trial.trial_id not in self.rows:
            self.rows[trial.trial_id] = TrialRow(trial.trial_id, self.recipe_of(trial.config))
        return self.rows[trial.trial_id]

    def _update(self) -> None:
        if self.live is not None:
            self.live.update(self._render())

    def on_step_begin(self, iteration, trials, **info):
        # A restored search's trials that ended before it was interrupted.
        ended = [t for t in trials if t.trial_id not in self.rows and t.status in ("TERMINATED", "ERROR")]
        for trial in ended:
            row, last = self._row(trial), trial.last_result or {}
            row.epochs, row.val_accuracy = int(last.get("epoch", 0)), last.get("val_accuracy")
            if trial.status == "ERROR":
                row.status = "failed"
            else:
                row.status = "finished" if row.epochs >= self.max_epochs else "stopped early"
        if ended:
            self._update()

    def on_experiment_end(self, trials, **info):
        self.ended_trials = list(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._row(trial).status = "running"
        self._update()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row.status, row.epochs = "running", int(result["epoch"])
        if row.val_accuracy is None or result["val_accuracy"] >= row.val_accuracy:
            row.val_accuracy, row.best_epoch = float(result["val_accuracy"]), row.epochs
        self._update()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        row = self._row(trial)
        row.status = "finished" if row.epochs >= self.max_epochs else "stopped early"
        self._update()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self._row(trial).status = "failed"
        self._update()

    def _render(self) -> Group:
        rows = list(self.rows.values())
        counts = {s: sum(r.status == s for r in rows) for s in ("running", "stopped early", "finished", "failed")}
        waiting = self.trials - sum(counts.values())
        summary = Text.from_markup(
            f"[bold]{self.trials} trials[/]: [cyan]{counts['running']} running[/], "
            f"[yellow]{counts['stopped early']} stopped early[/], [green]{counts['finished']} finished[/], "
            f"[red]{counts['failed']} failed[/], {waiting} to come")
        best = ranked(rows)
        leader = best[0] if best and best[0].val_accuracy is not None else None
        lines = [summary]
        if leader:
            lines.append(Text.from_markup(f"leader: [bold]{leader.trial}[/] {100 * leader.val_accuracy:.2f}% "
                                          f"validation accuracy at epoch {leader.best_epoch} "
                                          f"({recipe_text(leader.recipe)})"))
        shown = [r for r in rows if r.status == "running"]
        shown += [r for r in best if r not in shown][:max(0, SHOWN_TRIALS - len(shown))]
        if shown:
            lines.append(trials_table(shown, self.max_epochs))
        return Group(*lines)


_view: SearchView | None = None  # the view of the search running in this process


def _current_view() -> SearchView | None:
    return _view
