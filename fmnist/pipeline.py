"""The whole workflow in one Ray session: train, score the test set, evaluate, into one run directory."""

from __future__ import annotations

from pathlib import Path

import ray
from rich.console import Console

from fmnist.cluster import start_ray
from fmnist.errors import InputError
from fmnist.evaluation import Evaluation, evaluate_predictions, write_json
from fmnist.evaluation_report import plot_confusion_matrix, print_report
from fmnist.mistakes import write_mistakes
from fmnist.scoring import ScoreConfig, score
from fmnist.storage import StoragePath, is_uri
from fmnist.tracking import check_mlflow, log_evaluation
from fmnist.training import TrainConfig, train


def run_pipeline(config: TrainConfig, console: Console | None = None) -> Evaluation:
    """Train per ``config``; score the test set with the best checkpoint into ``<run>/predictions``;
    write ``<run>/report.json``, ``<run>/confusion_matrix.png`` and ``<run>/mistakes.png`` and print the report;
    the plots also go to the run's TensorBoard events, and with --mlflow all three to its MLflow run."""
    console = console or Console()
    if is_uri(config.storage_path):
        raise InputError(
            f"the pipeline needs a local or NFS --storage-path, not {config.storage_path}; "
            "on object storage run train, score and evaluate one by one"
        )
    check_mlflow(config.mlflow)
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
    write_mistakes(scored.output, evaluation, run_dir / "mistakes.png", "test", config.data_dir)
    files = {name: (run_dir / name).read_bytes() for name in ("report.json", "confusion_matrix.png", "mistakes.png")}
    log_evaluation(StoragePath.parse(str(run_dir)), trained.history[-1]["epoch"],
                   images={"confusion_matrix": files["confusion_matrix.png"], "mistakes": files["mistakes.png"]},
                   files=files, metrics={"evaluation_accuracy": evaluation.accuracy,
                                         "evaluation_macro_f1": evaluation.macro_avg["f1"]},
                   mlflow_uri=config.mlflow)
    console.print(f"report:   {run_dir / 'report.json'}\nplot:     {run_dir / 'confusion_matrix.png'}\n"
                  f"mistakes: {run_dir / 'mistakes.png'}", soft_wrap=True)
    return evaluation
