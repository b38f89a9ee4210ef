"""What each of the tutorial's techniques did in finished searches: their trials grouped by depth,
width, activation, learning rate, label smoothing and augmentation, compared at the grace period
(the epoch every trial reached) and at their best epoch; the epochs of the trials that ran their
whole budget, and what early stopping (--early-stopping) cut.

    python bench/search_techniques.py /work/searchruns/fixed /work/searchruns/free

Validation accuracy only (the trials never saw the test set). The groups are not controlled
experiments: the other knobs vary within each, so read a gap of a few tenths as noise.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _lr_band(lr: float) -> str:
    return "0.0002-0.0005" if lr < 5e-4 else "0.0005-0.0015" if lr <= 1.5e-3 else "0.0015-0.005"


def _leading_number(label: str) -> float:
    number = re.match(r"[0-9.]+", label)
    return float(number.group()) if number else float("inf")


GROUPS = {  # technique: what a trial's group is, from its leaderboard row
    "more layers (hidden layers)": lambda r: str(len(r["hidden"].split(","))),
    "wider layers (first layer's units)": lambda r: r["hidden"].split(",")[0],
    "activation": lambda r: r["activation"],
    "learning rate": lambda r: _lr_band(float(r["lr"])),
    "loss: label smoothing": lambda r: "none" if float(r["label_smoothing"]) == 0 else "0.05 .. 0.2",
    "augmentation": lambda r: r["augment"],
}


def _search(search_dir: Path) -> tuple[int, int, list[tuple[dict, list[float]]]]:
    """The search's grace period, budget, and each trial's row with its validation accuracy per epoch."""
    config = json.loads((search_dir / "search_config.json").read_text())
    trials = []
    for row in _rows(search_dir / "leaderboard.csv"):
        if row["status"] == "failed":
            continue
        history = _rows(Path(row["run_dir"]) / "history.csv")
        recipe = json.loads((Path(row["run_dir"]) / "train_config.json").read_text())
        row["augment"] = ",".join(recipe.get("augment", [])) or "none"  # runs of searches without augmentation lack it
        row["stopped_itself"] = history[-1].get("stopped_early") == "1"
        trials.append((row, [float(h["val_accuracy"]) for h in history]))
    return config["grace_period"], config["max_epochs"], trials


def _report(name: str, search_dir: Path) -> None:
    grace, budget, trials = _search(search_dir)
    print(f"\n## {name}: {len(trials)} trials, validation accuracy at epoch {grace} (every trial reached it)")
    print(f"| technique | group | trials | best at epoch {grace} | median at epoch {grace} | best at any epoch |")
    print("|---|---|---|---|---|---|")
    for technique, group_of in GROUPS.items():
        groups: dict[str, list[tuple[float, float]]] = {}
        for row, val in trials:
            groups.setdefault(group_of(row), []).append((val[grace - 1], max(val)))
        if len(groups) < 2:
            continue  # the search held it fixed
        for group, figures in sorted(groups.items(), key=lambda g: (_leading_number(g[0]), g[0])):
            at_grace = [at for at, _ in figures]
            print(f"| {technique} | {group} | {len(figures)} | {100 * max(at_grace):.2f}% "
                  f"| {100 * statistics.median(at_grace):.2f}% | {100 * max(b for _, b in figures):.2f}% |")
    stopped = [(row, val) for row, val in trials if row["stopped_itself"]]
    if stopped:
        print(f"\nearly stopping: {len(stopped)} of {len(trials)} trials stopped themselves, at epochs "
              f"{', '.join(str(len(val)) for _, val in stopped)} of {budget}")
    rungs = sorted({e for e in (grace, 3 * grace, budget) if e <= budget})  # ASHA's first rungs and the end
    print(f"\nmore epochs: the trials that ran all {budget} (validation accuracy at epochs "
          f"{', '.join(map(str, rungs))}; best)")
    for row, val in trials:
        if len(val) == budget:
            at_rungs = ", ".join(f"{100 * val[e - 1]:.2f}%" for e in rungs)
            print(f"- {row['trial']} ({row['hidden']} {row['activation']} lr={row['lr']} {row['schedule']}): "
                  f"{at_rungs}; best {100 * max(val):.2f}% at epoch {val.index(max(val)) + 1}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("search_dirs", nargs="+", type=Path)
    for search_dir in parser.parse_args().search_dirs:
        _report(search_dir.name, search_dir)


if __name__ == "__main__":
    main()
