"""The whole workflow in one Ray session: train, score the test set, evaluate, into one run directory."""

from __future__ import annotations

import ray
from rich.console import Console

from fmnist.cluster import start_ray
from fmnist.evaluation import Evaluation, evaluate_predictions, write_json
from fmnist.evaluation_report import plot_confusion_matrix, print_report
from fmnist.scoring import ScoreConfig, score
from fmnist.storage import StoragePath
from fmnist.training import TrainConfig, train


def run_pipeline(config: TrainConfig, console: Console | None = None) -> Evaluation:
    """Train per ``config``; score the test set with the best checkpoint into ``<run>/predictions``;
    write ``<run>/report.json`` and ``<run>/confusion_matrix.png`` and print the report.
    The run directory may be local, NFS or on object storage."""
    console = console or Console()
    started_ray = start_ray(config.verbose)
    try:
        trained = train(config, console)
        run_dir = StoragePath.parse(trained.run_dir)
        console.rule("Scoring the test set")
        scored = score(ScoreConfig(checkpoint=trained.best_checkpoint, output=run_dir.child("predictions").uri,
                                   data_dir=config.data_dir, use_gpu=trained.use_gpu, overwrite=True,
                                   resource_timeout_s=config.resource_timeout_s, verbose=config.verbose), console)
    finally:
        if started_ray:
            ray.shutdown()
    console.rule("Evaluation")
    evaluation = evaluate_predictions(scored.output)
    print_report(evaluation, console)
    report, plot = run_dir.child("report.json").uri, run_dir.child("confusion_matrix.png").uri
    write_json(evaluation, report)
    plot_confusion_matrix(evaluation, plot)
    console.print(f"report: {report}\nplot:   {plot}", soft_wrap=True)
    return evaluation
