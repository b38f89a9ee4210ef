"""The whole workflow in one Ray session: train, score the test set, evaluate, into one run directory."""

from __future__ import annotations

import ray
from rich.console import Console

from fmnist.core.cluster import start_ray
from fmnist.core.configs import TrainConfig
from fmnist.core.run_layout import CONFUSION_MATRIX_FILE, MISTAKES_FILE, PREDICTIONS_DIR, REPORT_FILE
from fmnist.core.storage import StoragePath
from fmnist.core.tracking import check_mlflow, log_evaluation
from fmnist.evaluate.metrics import Evaluation, evaluate_predictions, write_json
from fmnist.evaluate.mistakes import write_mistakes
from fmnist.evaluate.report import plot_confusion_matrix, print_report
from fmnist.score.scoring import ScoreConfig, score
from fmnist.train.trainer import runs_in_local_mode, train


def run_pipeline(config: TrainConfig, console: Console | None = None) -> Evaluation:
    """Train per ``config``; score the test set with the best checkpoint into ``<run>/predictions``;
    write ``<run>/report.json``, ``<run>/confusion_matrix.png`` and ``<run>/mistakes.png`` and print the report;
    the plots also go to the run's TensorBoard events, and with --mlflow all three to its MLflow run.
    The run directory may be local, NFS or on object storage."""
    console = console or Console()
    check_mlflow(config.mlflow)
    # Training in local mode needs no Ray: it starts for scoring. Otherwise both share one.
    started_ray = False if runs_in_local_mode(config) else start_ray(config.verbose)
    try:
        trained = train(config, console)
        started_ray = start_ray(config.verbose) or started_ray
        run_dir = StoragePath.parse(trained.run_dir)
        console.rule("Scoring the test set")
        # On CPUs, also after training on GPUs: for 10,000 images a GPU actor's start (torch, CUDA)
        # costs several times the CPUs' whole job (bench/RESULTS.md, GPU), and the predictions agree.
        scored = score(ScoreConfig(checkpoint=trained.best_checkpoint, output=run_dir.child(PREDICTIONS_DIR).uri,
                                   data_dir=config.data_dir, use_gpu=False, overwrite=True,
                                   resource_timeout_s=config.resource_timeout_s, verbose=config.verbose), console)
    finally:
        if started_ray:
            ray.shutdown()
    console.rule("Evaluation")
    evaluation = evaluate_predictions(scored.output)
    print_report(evaluation, console)
    report, plot, mistakes = (run_dir.child(name) for name in (REPORT_FILE, CONFUSION_MATRIX_FILE, MISTAKES_FILE))
    write_json(evaluation, report.uri)
    plot_confusion_matrix(evaluation, plot.uri)
    write_mistakes(scored.output, evaluation, mistakes.uri, "test", config.data_dir)
    files = {f.name: f.read_bytes() for f in (report, plot, mistakes)}
    log_evaluation(run_dir, trained.history[-1]["epoch"],
                   images={"confusion_matrix": files[CONFUSION_MATRIX_FILE], "mistakes": files[MISTAKES_FILE]},
                   files=files, metrics={"evaluation_accuracy": evaluation.accuracy,
                                         "evaluation_macro_f1": evaluation.macro_avg["f1"]},
                   mlflow_uri=config.mlflow)
    console.print(f"report:   {report.uri}\nplot:     {plot.uri}\nmistakes: {mistakes.uri}", soft_wrap=True)
    return evaluation
