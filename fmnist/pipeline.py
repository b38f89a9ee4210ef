"""The whole workflow in one Ray session: train, score the test set, evaluate, into one run directory."""

from __future__ import annotations

from pathlib import Path

import ray
from rich.console import Console

from fmnist.cluster import start_ray
from fmnist.errors import InputError
from fmnist.evaluation import Evaluation, evaluate_predictions, write_json
from fmnist.evaluation_report import plot_confusion_matrix, print_report
from fmnist.scoring import ScoreConfig, score
from fmnist.storage import is_uri
from fmnist.training import TrainConfig, train


def run_pipeline(config: TrainConfig, console: Console | None = None) -> Evaluation:
    """Train per ``config``; score the test set with the best checkpoint into ``<run>/predictions``;
    write ``<run>/report.json`` and ``<run>/confusion_matrix.png`` and print the report."""
    console = console or Console()
    if is_uri(config.storage_path):
        raise InputError(
            f"the pipeline needs a local or NFS --storage-path, not {config.storage_path}; "
            "on object storage run train, score and evaluate one by one"
        )
    started_ray = start_ray(config.verbose)
    try:
        trained = train(config, console)
        run_dir = Path(trained.run_dir)
        console.rule("Scoring the test set")
        scored = score(ScoreConfig(checkpoint=trained.best_checkpoint, output=str(run_dir / "predictions"),
                                   data_dir=config.data_dir, use_gpu=trained.use_gpu, overwrite=True,
                                   resource_timeout_s=config.resource_timeout_s, verbose=config.verbose), console)
    finally:
        if started_ray:
            ray.shutdown()
    console.rule("Evaluation")
    evaluation = evaluate_predictions(scored.output)
    print_report(evaluation, console)
    write_json(evaluation, run_dir / "report.json")
    plot_confusion_matrix(evaluation, run_dir / "confusion_matrix.png")
    console.print(f"report: {run_dir / 'report.json'}\nplot:   {run_dir / 'confusion_matrix.png'}", soft_wrap=True)
    return evaluation
