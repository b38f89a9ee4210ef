"""The command line: ``fmnist train|score|evaluate|pipeline|tune|serve`` (``python -m fmnist``, workflows/*.py).

Exit status: 0 success; 1 the job ran but missed its goal; 2 bad input or usage, with one
``error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from fmnist.core.configs import (
    AUGMENTATIONS, CPU_WORKERS, DEFAULT_EPOCHS, MAX_VALIDATION, MAX_WIDTH, NON_NEGATIVE, NON_NEGATIVE_INT,
    POSITIVE_INT, SCHEDULES, SEED, TRAIN_RULES, Rule, SearchConfig, TrainConfig, parse_augmentations,
)
from fmnist.core.errors import InputError, JobFailed
from fmnist.core.storage import is_uri


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other input error."""

    def error(self, message: str):  # type: ignore[override]
        raise InputError(f"{message} (see '{self.prog} --help')")


def _hidden_widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 256,128,64, got {text!r}")
    if not widths or min(widths) < 1 or max(widths) > MAX_WIDTH:
        raise argparse.ArgumentTypeError(f"expected widths from 1 to {MAX_WIDTH:,}, got {text!r}")
    return widths


def _checked(convert, accept, expected: str):
    """An argparse type: ``convert`` the text, and refuse values that ``accept`` says no to (and inf, nan)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def _by(rule: Rule):
    """An argparse type of a config's rule: the command line refuses what the config would."""
    return _checked(rule.kind, rule.accept, rule.expected)


_positive_int = _by(POSITIVE_INT)
_non_negative_int = _by(NON_NEGATIVE_INT)
_seed = _by(SEED)
_fraction = _checked(float, lambda v: 0 <= v <= 1, "a fraction in [0, 1] like 0.88")


def _augmentations(text: str) -> tuple[str, ...]:
    try:
        return parse_augmentations(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _output_file(text: str) -> str:
    """An argparse type for a file to write: checked before the work, not after it (a URI: when written)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, got ''")
    if is_uri(text):
        return text
    path = Path(text)
    directory = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; pass a file path")
    if not directory.is_dir():
        raise argparse.ArgumentTypeError(f"directory {str(directory)!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise argparse.ArgumentTypeError(f"directory {str(directory)!r} is not writable")
    return text


def _ray_arguments(p: argparse.ArgumentParser, resource_timeout_s: float) -> None:
    """What every command that runs on Ray takes: how long to wait for a cluster's resources, and --verbose."""
    p.add_argument("--resource-timeout", dest="resource_timeout_s", type=_by(NON_NEGATIVE),
                   default=resource_timeout_s, metavar="SECONDS",
                   help="on a cluster, how long to wait for the CPUs/GPUs asked for to appear (default %(default)g)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own log lines")


def _gpu_arguments(p: argparse._ArgumentGroup) -> None:
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--use-gpu", action="store_true", default=None,
                     help="train on GPUs (default: when the cluster has GPUs)")
    gpu.add_argument("--no-gpu", dest="use_gpu", action="store_false", help="train on CPUs only")


def _mlflow_argument(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--mlflow", nargs="?", const="", default=None, metavar="TRACKING_URI",
                   help=f"{help_text} (needs pip install -e '.[mlflow]' in the checkout)")


def _config_from_args(config_class, args: argparse.Namespace):
    """A config dataclass from parsed options: each option's dest is one of its fields."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names})


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from fmnist.core.model_config import ACTIVATIONS

    d = TrainConfig()
    rule = {field: _by(r) for field, r in TRAIN_RULES.items()}  # each option refuses what TrainConfig would
    run = p.add_argument_group("run")
    run.add_argument("--epochs", type=rule["epochs"], default=d.epochs,
                     help=f"epochs to train (default {DEFAULT_EPOCHS}; on --resume the run's own, or more)")
    run.add_argument("--num-workers", type=rule["num_workers"], default=d.num_workers, metavar="W",
                     help=f"Ray Train workers, data parallel (default: 1 with every core on your own machine, "
                          f"{CPU_WORKERS} on a CPU cluster, one per GPU on GPUs)")
    _gpu_arguments(run)
    run.add_argument("--cpus-per-worker", type=rule["cpus_per_worker"], default=None, metavar="N",
                     help="CPUs each worker reserves and uses as torch threads "
                          "(default: the cluster's CPUs shared among the workers, locally; 1 on a cluster)")
    run.add_argument("--storage-path", default=d.storage_path,
                     help="where run directories go: a local/NFS path or s3://, gs:// (default %(default)s)")
    run.add_argument("--name", default=None, help="run directory name (default: train-<date>-<time>)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run --name (default: the latest run) from its last checkpoint")
    run.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST IDX files")
    run.add_argument("--keep", type=rule["keep"], default=d.keep,
                     help="checkpoints to keep: the latest, or with --validation the best by validation accuracy "
                          "and the latest (default %(default)s)")
    run.add_argument("--max-failures", type=rule["max_failures"], default=d.max_failures,
                     help="worker failures to recover from, from the last checkpoint (default %(default)s)")
    _ray_arguments(run, d.resource_timeout_s)
    _mlflow_argument(run, "also log the run to MLflow: recipe, every epoch's figures, best checkpoint, plots; "
                          "the default URI is $MLFLOW_TRACKING_URI, else MLflow's local default")
    recipe = p.add_argument_group("recipe (defaults are the tutorial's)")
    recipe.add_argument("--lr", type=rule["lr"], default=d.lr, help="Adam learning rate (default %(default)s)")
    recipe.add_argument("--batch-size", type=rule["batch_size"], default=d.batch_size,
                        help="global batch size, split across workers (default %(default)s)")
    recipe.add_argument("--hidden", type=_hidden_widths, default=d.hidden,
                        help="hidden layer widths (default 256,128,64)")
    recipe.add_argument("--activation", choices=ACTIVATIONS, default=d.activation,
                        help="activation after each hidden layer (default %(default)s)")
    recipe.add_argument("--dropout", type=rule["dropout"], default=d.dropout, help="dropout (default %(default)s)")
    recipe.add_argument("--weight-decay", type=rule["weight_decay"], default=d.weight_decay,
                        help="Adam weight decay (default %(default)s)")
    recipe.add_argument("--label-smoothing", type=rule["label_smoothing"], default=d.label_smoothing,
                        help="label smoothing of the training loss (default %(default)s)")
    recipe.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                        help="learning-rate schedule over the epochs (default %(default)s)")
    recipe.add_argument("--seed", type=rule["seed"], default=d.seed, help="random seed (default %(default)s)")
    _validation_argument(recipe, d.validation, rule["validation"], "none; the last checkpoint is the run's")
    recipe.add_argument("--augment", type=_augmentations, default=d.augment, metavar="LIST",
                        help=f"augment each training batch: 'none' or any of {','.join(AUGMENTATIONS)} "
                             "(left-right flips, shifts of up to 2 pixels, a blanked rectangle; default none)")
    recipe.add_argument("--early-stopping", type=rule["early_stopping"], default=d.early_stopping, metavar="N",
                        help="stop once validation accuracy has not improved for N epochs; needs --validation "
                             "(default %(default)s: never)")


def _validation_argument(p: argparse.ArgumentParser, default: int, check, meaning: str) -> None:
    p.add_argument("--validation", type=check, default=default, metavar="N",
                   help="hold out N training images (class-balanced, drawn from --seed) to report validation "
                        f"figures and choose the best checkpoint on (default %(default)s: {meaning})")


def _train_config(args: argparse.Namespace):
    return _config_from_args(TrainConfig, args)


def _run_train(args: argparse.Namespace) -> int:
    from fmnist.train.trainer import train

    train(_train_config(args))
    return 0


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    from fmnist.score.scoring import ScoreConfig as d

    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or run directory (its best)")
    p.add_argument("--output", required=True,
                   help="directory to write the Parquet predictions to: local/NFS or s3://, gs://")
    p.add_argument("--input", default="test",
                   help="'test' (the 10,000 test images), a directory of PNG/JPEG images (labelled where "
                        "they sit in sub-folders named by class or 0-9), one image file, or Parquet, a file or a "
                        "directory; local/NFS or "
                        "s3://, gs:// (default %(default)s)")
    p.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST IDX files (for --input test)")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help="images per batch (default %(default)s)")
    p.add_argument("--concurrency", type=_positive_int, default=d.concurrency, metavar="N",
                   help="scoring tasks at once (default: one per CPU); with --use-gpu, model actors (default: one per GPU)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per model actor")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of failing")
    _ray_arguments(p, d.resource_timeout_s)


def _run_score(args: argparse.Namespace) -> int:
    from fmnist.score.scoring import ScoreConfig, score

    score(_config_from_args(ScoreConfig, args))
    return 0


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("predictions", metavar="PREDICTIONS_DIR",
                   help="directory of Parquet predictions (fmnist score's --output): local/NFS or s3://, gs://")
    p.add_argument("--json", type=_output_file, default=None, metavar="FILE", help="write the figures as JSON")
    p.add_argument("--plot", type=_output_file, default=None, metavar="FILE",
                   help="write the confusion matrix as a PNG heatmap")
    p.add_argument("--mistakes", type=_output_file, default=None, metavar="FILE",
                   help="write a PNG grid of the most confident mistakes of the most confused class pairs")
    p.add_argument("--images", default=None, metavar="INPUT",
                   help="with --mistakes: the --input the predictions were scored from ('test', a directory of "
                        "images, or Parquet); default: the image files the predictions name, else 'test'")
    p.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST IDX files (for --images test)")
    _min_accuracy_argument(p)


def _run_evaluate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fmnist.evaluate.metrics import evaluate_predictions, write_json, write_report_file
    from fmnist.evaluate.report import plot_confusion_matrix, print_report

    _check_report_files(args.predictions, {"--json": args.json, "--plot": args.plot, "--mistakes": args.mistakes})
    if args.images is not None and not args.mistakes:
        raise InputError("--images is for --mistakes; pass --mistakes FILE.png too")
    evaluation = evaluate_predictions(args.predictions)
    # Drawn before the report: a wrong --images is one error line, not a report and then an error.
    mistakes = None
    if args.mistakes:
        from fmnist.evaluate.mistakes import render_mistakes  # matplotlib and the image readers: only for --mistakes

        mistakes = render_mistakes(args.predictions, evaluation, args.images, args.data_dir)
    console = Console()
    print_report(evaluation, console)
    if args.json:
        write_json(evaluation, args.json)
    if args.plot:
        plot_confusion_matrix(evaluation, args.plot)
    if mistakes:
        write_report_file(args.mistakes, mistakes, "--mistakes")
        console.print(f"mistakes: {args.mistakes}", soft_wrap=True)
    return _accuracy_gate(evaluation.accuracy, args.min_accuracy)


def _check_report_files(predictions: str, outputs: dict[str, str | None]) -> None:
    """The report files must be different files, and none one of the predictions they report on."""
    def resolved(path: str) -> str:
        return path.rstrip("/") if is_uri(path) else str(Path(path).resolve())

    files = {option: resolved(path) for option, path in outputs.items() if path}
    for i, (option, file) in enumerate(files.items()):
        for other, other_file in list(files.items())[i + 1:]:
            if file == other_file:
                raise InputError(f"{option} and {other} name the same file; pass two files")
    source = resolved(predictions)
    for option, file in files.items():
        if file == source or (file.startswith(source + "/") and file.endswith((".parquet", "/_SUCCESS"))):
            raise InputError(f"{option} {file} is one of the predictions to evaluate; pass another file")


def _min_accuracy_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-accuracy", type=_fraction, default=None, metavar="A",
                   help="exit 1 when the accuracy is below A (a fraction, e.g. 0.88)")


def _accuracy_gate(accuracy: float, min_accuracy: float | None) -> int:
    """Exit status 1 when a --min-accuracy gate is not met."""
    if min_accuracy is not None and accuracy < min_accuracy:
        print(f"accuracy {accuracy:.4f} is below --min-accuracy {min_accuracy}", file=sys.stderr)
        return 1
    return 0


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    add_train_arguments(p)
    _min_accuracy_argument(p)


def _run_pipeline(args: argparse.Namespace) -> int:
    from fmnist.pipeline import run_pipeline

    evaluation = run_pipeline(_train_config(args))
    return _accuracy_gate(evaluation.accuracy, args.min_accuracy)


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    d = SearchConfig()
    search = p.add_argument_group("search")
    search.add_argument("--trials", type=_positive_int, default=d.trials, help="trials to run (default %(default)s)")
    search.add_argument("--max-epochs", type=_positive_int, default=d.max_epochs,
                        help="epochs of a trial that ASHA does not stop: each trial's --epochs (default %(default)s)")
    search.add_argument("--grace-period", type=_positive_int, default=d.grace_period,
                        help="epochs every trial trains before ASHA may stop it (default %(default)s)")
    search.add_argument("--space", default=None, metavar="FILE",
                        help="search space, a JSON file like fmnist/tune/search_space.json (default: that file)")
    search.add_argument("--architecture", type=_hidden_widths, default=None, metavar="W,W",
                        help="fix the hidden widths (e.g. 256,128,64) and search the recipe only")
    search.add_argument("--search", choices=("random", "optuna"), default=d.search,
                        help="random search, or Optuna's model-based sampler (default %(default)s)")
    search.add_argument("--seed", type=_seed, default=d.seed,
                        help="seed of the search, the validation split and every trial (default %(default)s)")
    _validation_argument(search, d.validation,
                         _checked(int, lambda v: 1 <= v <= MAX_VALIDATION, f"an integer from 1 to {MAX_VALIDATION:,}"),
                         "a search always chooses on validation figures")
    search.add_argument("--confirm", type=_non_negative_int, default=d.confirm, metavar="N",
                        help="retrain the best recipe on the full training set with N seeds and report its "
                             "test accuracy, mean ± sd (default: no)")
    run = p.add_argument_group("run")
    run.add_argument("--workers-per-trial", type=_positive_int, default=d.workers_per_trial, metavar="W",
                     help="Ray Train workers of each trial (default %(default)s)")
    run.add_argument("--cpus-per-worker", type=_positive_int, default=d.cpus_per_worker, metavar="N",
                     help="CPUs each worker reserves and uses as torch threads (default %(default)s)")
    run.add_argument("--concurrency", type=_positive_int, default=None, metavar="C",
                     help="trials at once (default: as many as the cluster holds)")
    _gpu_arguments(run)
    run.add_argument("--storage-path", default=d.storage_path,
                     help="where search directories go: a local/NFS path or s3://, gs:// (default %(default)s)")
    run.add_argument("--name", default=None, help="search directory name (default: tune-<date>-<time>)")
    _mlflow_argument(run, "also log each trial to MLflow, as train --mlflow logs a run")
    run.add_argument("--resume", action="store_true",
                     help="continue the search --name where it stopped (finished trials are not rerun)")
    run.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST IDX files")
    run.add_argument("--max-failures", type=_non_negative_int, default=d.max_failures,
                     help="worker failures each trial recovers from, from its last checkpoint (default %(default)s)")
    _ray_arguments(run, d.resource_timeout_s)


def _run_tune(args: argparse.Namespace) -> int:
    from fmnist.tune.search import run_search

    run_search(_config_from_args(SearchConfig, args))
    return 0


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from fmnist.serve.app import DEFAULT_MAX_REPLICAS, ServeConfig

    d = ServeConfig(checkpoint="")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or run directory (its best)")
    p.add_argument("--port", type=_checked(int, lambda v: 1 <= v <= 65535, "a port number from 1 to 65535"),
                   default=d.port, help="HTTP port (default %(default)s)")
    p.add_argument("--host", default=d.host,
                   help="address to listen on (default %(default)s: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--replicas", type=_replicas, default=d.replicas, metavar="N|auto",
                   help="model replicas, one CPU (or GPU) each; auto: from 1 to --max-replicas, following the "
                        "load (default %(default)s)")
    p.add_argument("--max-replicas", type=_positive_int, default=d.max_replicas, metavar="N",
                   help=f"with --replicas auto: at most N replicas (default {DEFAULT_MAX_REPLICAS})")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per replica, the torch model on it")
    _ray_arguments(p, d.resource_timeout_s)


def _replicas(text: str) -> int | str:
    return "auto" if text == "auto" else _checked(int, lambda v: v >= 1, "a positive integer or 'auto'")(text)


def _run_serve(args: argparse.Namespace) -> int:
    from fmnist.serve.app import ServeConfig
    from fmnist.serve.command import serve_forever

    # Returns at once after updating a running application; otherwise only by Ctrl-C (KeyboardInterrupt).
    serve_forever(_config_from_args(ServeConfig, args))
    return 0


class _Version(argparse.Action):
    """--version: fmnist's, and the Ray and torch it runs with (a Ray client must match its cluster's Ray)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the versions of fmnist, Ray, torch and Python")

    def __call__(self, parser, namespace, values, option_string=None):
        import platform
        from importlib.metadata import version

        from fmnist import __version__

        print(f"fmnist {__version__} (Ray {version('ray')}, torch {version('torch')}, "
              f"Python {platform.python_version()})")
        parser.exit()


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed arguments of an ``fmnist`` command line (``argv`` without the program name).

    Only the named command's options are built: score's import the Ray Data job their defaults live
    in, and a command should import only what it runs (`fmnist evaluate` needs neither Ray nor torch)."""
    parser = _Parser(prog="fmnist", description="Train, batch-score and evaluate a Fashion-MNIST classifier on Ray.",
                     epilog="Exit status: 0 success; 1 the job ran but failed or missed its goal (--min-accuracy); "
                            "2 bad input or usage (one 'error:' line); 130 interrupted.")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands = {
        "train": ("train the classifier with Ray Train", add_train_arguments, _run_train),
        "score": ("batch-score images into Parquet with Ray Data", add_score_arguments, _run_score),
        "evaluate": ("report accuracy and per-class figures of Parquet predictions", add_evaluate_arguments,
                     _run_evaluate),
        "pipeline": ("train, score the test set and evaluate, into one run directory", add_pipeline_arguments,
                     _run_pipeline),
        "tune": ("search hyperparameters with Ray Tune: trials of Ray Train runs, ASHA on validation accuracy",
                 add_tune_arguments, _run_tune),
        "serve": ("serve predictions over HTTP with Ray Serve: POST /predict, a page at /", add_serve_arguments,
                  _run_serve),
    }
    for name, (help_text, add_arguments, run) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:
            add_arguments(p)
        p.set_defaults(run=run)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would blame the top-level parser; the subcommand's --help is the useful one
        raise InputError(f"unrecognized arguments: {' '.join(unknown)} (see 'fmnist {args.command} --help')")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_arguments(sys.argv[1:] if argv is None else argv)
        return args.run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JobFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# Importing torch and Ray makes ~0.5 M objects that live as long as the process. At the cyclic
# collector's default thresholds its passes over them cost ~0.6 s of a command's start, and the
# interpreter's last collection at exit ~0.9 s more (measured on 2 cores); neither finds garbage.
GC_THRESHOLDS = (50_000, 20, 100)  # Python's default: (700, 10, 10)


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """main() as a process of its own: the `fmnist` command, workflows/*.py, python -m fmnist."""
    gc.set_threshold(*GC_THRESHOLDS)
    code = main(argv)
    gc.freeze()  # what is left goes with the process: keep it out of the last collection
    sys.exit(code)


def workflow_main(command: str) -> NoReturn:
    """Entry point of workflows/<command>.py: ``python workflows/train.py ...``."""
    run([command, *sys.argv[1:]])
