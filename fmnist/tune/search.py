"""Hyperparameter search on Ray Tune: every trial is a Ray Train run of the same training loop.

Each trial is a function trainable that calls ``training.train`` on a recipe drawn from the search
space, holding out the same validation images. On one's own machine a trial of one worker trains
in local mode, in the trial's own process (no placement group of its own, so nothing is left
behind when Tune stops it; training._fit_locally has the shim this needs) and reports each epoch
to Tune itself; on a cluster it runs Ray Train's workers, and ``TuneReportCallback`` forwards each
epoch's figures, as Ray's docs show. ASHA stops trials whose validation accuracy falls behind.
Trials are chosen on validation accuracy alone; the test set is only for reported figures, and
``--confirm`` retrains the best recipe on the whole training set.

The search directory ``<storage-path>/<name>/`` holds Tune's experiment state (its per-trial
``tune_<id>`` directories), each trial's run directory ``trial_<id>`` (history, checkpoints:
``fmnist score --checkpoint`` takes it), ``search_config.json``, ``leaderboard.csv`` and
``best_config.json``.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import ray
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from rich.console import Console

from fmnist.core.cluster import is_embedded, room_for, start_ray, wait_for_resources
from fmnist.core.configs import SearchConfig, TrainConfig, train_arguments
from fmnist.core.data import FashionMNIST, load_fashion_mnist
from fmnist.core.errors import InputError, JobFailed, error_line
from fmnist.core.run_layout import (BEST_CONFIG_FILE, HISTORY_FILE, LEADERBOARD_FILE, RUN_CONFIG_FILE,
                                    SEARCH_CONFIG_FILE, read_history, run_or_search_dir, stopped_early,
                                    storage_root)
from fmnist.core.signals import signal_handler
from fmnist.core.storage import StoragePath
from fmnist.core.tracking import check_mlflow, prepare_mlflow
from fmnist.train.trainer import train
from fmnist.tune.report import SearchView, TrialRow, leaderboard_csv, ranked, recipe_text, trials_table
from fmnist.tune.space import load_space, recipe, tune_space

HISTORY_WAIT_S = 30  # how long a trial's report waits for the driver to write its epoch into history.csv
REDUCTION_FACTOR = 3  # ASHA keeps the best third at each rung
LEADERBOARD_SHOWN = 10
TRIAL_MEMORY = 512 * 1024**2  # bytes: a trial's own process, which holds the data set while its run starts
# What a search keeps on --resume: everything that decides which trials it runs and how.
SEARCH_FIELDS = ("trials", "max_epochs", "grace_period", "space", "architecture", "search", "workers_per_trial",
                 "cpus_per_worker", "seed", "validation", "max_failures")


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a search shares, as its trainable receives it."""

    search_dir: str
    max_epochs: int
    validation: int
    seed: int
    workers_per_trial: int
    cpus_per_worker: int
    use_gpu: bool
    architecture: tuple[int, ...] | None
    max_failures: int
    mlflow: str | None  # the tracking URI, resolved on the driver
    local_mode: bool  # each trial trains in its own process (one's own machine, one worker a trial)


@dataclass
class SearchResult:
    search_dir: str
    rows: list[TrialRow]  # ranked, best first
    best: TrialRow | None
    train_command: str | None  # the `fmnist train` command reproducing the best trial
    confirmed: list[float] | None  # --confirm: the final test accuracy of each seed


# ----------------------------------------------------------------------------- a trial


def trial_config(trial_recipe: dict, settings: TrialSettings, name: str) -> TrainConfig:
    """The TrainConfig of a search's run ``name`` of ``trial_recipe``: InputError for an impossible
    recipe, as `fmnist train` would refuse it, which fails that trial alone."""
    return TrainConfig(**trial_recipe, epochs=settings.max_epochs, validation=settings.validation, seed=settings.seed,
                       num_workers=settings.workers_per_trial, cpus_per_worker=settings.cpus_per_worker,
                       use_gpu=settings.use_gpu, storage_path=settings.search_dir, name=name,
                       max_failures=settings.max_failures, mlflow=settings.mlflow)


def train_command(config: TrainConfig, trial_recipe: dict) -> str:
    """The `fmnist train` command that trains ``trial_recipe`` as the search's trial ``config`` did."""
    fields = [*trial_recipe, "epochs", "validation", "seed", "num_workers"]
    return "fmnist train " + shlex.join(train_arguments(config, fields))


class _ReportToTune(TuneReportCallback):
    """TuneReportCallback, once the epoch is in the trial's history.csv: Tune may stop the trial on
    any report, and the trial's run directory should hold every epoch it reached."""

    def __init__(self, run_dir: StoragePath):
        super().__init__()
        self.run_dir = run_dir

    def after_report(self, run_context, metrics, checkpoint):
        epoch, deadline = metrics[0]["epoch"], time.monotonic() + HISTORY_WAIT_S
        while _epochs_in_history(self.run_dir) < epoch:
            if time.monotonic() >= deadline:
                print(f"warning: {self.run_dir.uri}/{HISTORY_FILE} did not show epoch {epoch} within "
                      f"{HISTORY_WAIT_S:g} s; reporting it to Ray Tune without (if Tune stops the trial now, "
                      "its history ends an epoch short)", file=sys.stderr)
                break
            time.sleep(0.05)
        super().after_report(run_context, metrics, checkpoint)


def _run_trial(sample: dict, data: FashionMNIST, settings: TrialSettings) -> None:
    """The trainable: one Ray Train run, named after the trial so that a restored search continues it."""
    name = f"trial_{ray.tune.get_context().get_trial_id()}"
    config = trial_config(recipe(sample, settings.architecture), settings, name)
    run_dir = StoragePath.parse(settings.search_dir).child(name)
    config = replace(config, resume=run_dir.child(RUN_CONFIG_FILE).exists())
    history = read_history(run_dir) if config.resume else []
    if len(history) >= config.epochs or stopped_early(history):
        # Interrupted after its last epoch, before Tune saw it end: the run is whole (and training it
        # again would be refused). Tell Tune how it ended.
        ray.tune.report({"epoch": int(history[-1]["epoch"]), "val_accuracy": float(history[-1]["val_accuracy"])})
        return
    if settings.local_mode:
        train(config, Console(quiet=True), data=data, local_mode=True, tune_trial=True)
    else:
        train(config, Console(quiet=True), data=data, callbacks=[_ReportToTune(run_dir)], local_mode=False)


def _tune_dirname(trial) -> str:
    return f"tune_{trial.trial_id}"


# ----------------------------------------------------------------------------- reading trials back


def _epochs_in_history(run_dir: StoragePath) -> int:
    try:
        return len(read_history(run_dir))
    except OSError:
        return 0


def _trial_failure(error: BaseException | None) -> str:
    """The cause of a trial's failure in one line: the last line of its error, without the exception's name."""
    return re.sub(r"^[\w.]*(Error|Exception|Failed): ", "", error_line(error))[:300]


def trial_rows(trials, interrupted: set[str], search_dir: StoragePath, settings: TrialSettings) -> list[TrialRow]:
    """Each trial as its own run directory records it, and how it ended (``interrupted``: the ids of
    those a Ctrl-C stopped), best first."""
    rows = []
    for trial in trials:
        run_dir = search_dir.child(f"trial_{trial.trial_id}")
        history = read_history(run_dir)
        row = TrialRow(trial.trial_id, recipe(trial.config, settings.architecture), epochs=len(history),
                       run_dir=run_dir.uri if history else "")
        if history:
            best = max(history, key=lambda r: (float(r["val_accuracy"]), int(r["epoch"])))
            row.val_accuracy, row.best_epoch = float(best["val_accuracy"]), int(best["epoch"])
        if trial.status == "ERROR":
            row.status, row.error = "failed", _trial_failure(trial.get_error())
        elif trial.status == "TERMINATED" and trial.trial_id not in interrupted:
            row.status = "finished" if row.epochs >= settings.max_epochs else "stopped early"
        else:
            row.status = "pending"  # interrupted, or not started: a --resume runs it
        rows.append(row)
    return ranked(rows)


# ----------------------------------------------------------------------------- the search


def _pick_search_dir(config: SearchConfig) -> tuple[StoragePath, SearchConfig]:
    if config.resume and config.name is None:
        raise InputError("--resume needs --name: the search to continue")
    search_dir = run_or_search_dir(storage_root(config.storage_path), config.name, config.resume, "search",
                                   SEARCH_CONFIG_FILE)
    name = search_dir.name
    if not config.resume:
        return search_dir, replace(config, name=name)
    try:
        saved = json.loads(search_dir.read_text(SEARCH_CONFIG_FILE))
        kept = {k: saved[k] for k in SEARCH_FIELDS}
        kept["architecture"] = tuple(kept["architecture"]) if kept["architecture"] else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--resume: {search_dir.uri}/{SEARCH_CONFIG_FILE} is damaged ({type(e).__name__}: {e})") \
            from None
    return search_dir, replace(config, name=name, **kept)


def check_search(config: SearchConfig) -> tuple[StoragePath, SearchConfig, dict]:
    """Everything about the search's input that can be checked before Ray starts; the search
    directory, the config to run with (a resumed search's own), and its space."""
    if config.max_epochs < config.grace_period:
        raise InputError(f"--max-epochs {config.max_epochs} is below ASHA's grace period of "
                         f"{config.grace_period} epochs; pass more --max-epochs or a smaller --grace-period")
    if config.validation < 1:
        raise InputError("--validation must hold out some images: a search chooses on validation figures only")
    if config.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise InputError("--search optuna needs Optuna; install it in the checkout with: "
                             "pip install -e '.[optuna]'") from None
    check_mlflow(config.mlflow)
    if config.workers_per_trial > 200:  # the global batch is split across the workers (batch sizes >= 100)
        raise InputError("--workers-per-trial must be at most 200")
    search_dir, config = _pick_search_dir(config)
    if config.resume:
        space = json.loads(search_dir.read_text(SEARCH_CONFIG_FILE)).get("space_file", {})
        return search_dir, config, space
    space = load_space(config.space, config.architecture)
    return search_dir, config, space


def _trial_placement(config: SearchConfig, console: Console) -> tuple[bool, int]:
    """GPUs or not, and how many trials run at once."""
    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    bundle = {"CPU": config.cpus_per_worker, "GPU": int(use_gpu)}
    remedy = "ask for fewer (--workers-per-trial, --cpus-per-worker)" + (" or --no-gpu" if use_gpu else "")
    wait_for_resources(bundle, config.workers_per_trial, f"a trial of {config.workers_per_trial} worker(s)", remedy,
                       config.resource_timeout_s, console)
    holds = max(1, room_for({k: v for k, v in bundle.items() if v}) // config.workers_per_trial)
    return use_gpu, min(config.concurrency or holds, config.trials)


def run_search(config: SearchConfig, console: Console | None = None) -> SearchResult:
    """Run (or, with ``resume``, continue) the search of ``config``; write its leaderboard and best recipe."""
    console = console or Console()
    search_dir, config, space = check_search(config)
    data = load_fashion_mnist(config.data_dir)  # validated before Ray starts
    if not config.verbose:
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # failed trials: the view and leaderboard say why
    # Ray's processes inherit an ignored SIGINT: a Ctrl-C in the terminal then reaches only this
    # process, where Tune stops the search and saves it, instead of ending the trials' own processes
    # (Tune would take a trial ended that way for finished, and never resume it).
    with signal_handler(signal.SIGINT, signal.SIG_IGN):
        started_ray = start_ray(config.verbose)
    try:
        use_gpu, concurrency = _trial_placement(config, console)
        settings = TrialSettings(search_dir.uri, config.max_epochs, config.validation, config.seed,
                                 config.workers_per_trial, config.cpus_per_worker, use_gpu, config.architecture,
                                 config.max_failures,
                                 prepare_mlflow(config.mlflow) if config.mlflow is not None else None,
                                 local_mode=is_embedded() and config.workers_per_trial == 1)
        if not config.resume:
            search_dir.write(SEARCH_CONFIG_FILE, json.dumps({**asdict(config), "space_file": space}, indent=2).encode())
        trials, cut_short = _fit(config, settings, space, search_dir, concurrency, data, console)
        rows = trial_rows(trials, cut_short, search_dir, settings)
        search_dir.write(LEADERBOARD_FILE, leaderboard_csv(rows).encode())
        interrupted = len(trials) < config.trials or any(r.status == "pending" for r in rows)
        if interrupted:
            console.print(f"[yellow]Interrupted.[/] Continue with: fmnist tune --resume "
                          f"--storage-path {config.storage_path} --name {config.name}", soft_wrap=True)
            raise KeyboardInterrupt
        return _report(config, settings, rows, search_dir, console)
    finally:
        if started_ray:
            ray.shutdown()


def _fit(config: SearchConfig, settings: TrialSettings, space: dict, search_dir: StoragePath, concurrency: int,
         data: FashionMNIST, console: Console) -> tuple[list, set[str]]:
    """Run the Tuner with the live view; returns Tune's trials as the search ends, and the ids of those
    it was running when interrupted."""
    # A local-mode trial trains in its own process, and holds its worker's CPUs/GPU; otherwise the
    # trial only drives its Ray Train run, whose workers hold them, and reserves memory alone (Tune
    # needs it to reserve something), for the data it hands on.
    resources = {"cpu": settings.cpus_per_worker, "gpu": int(settings.use_gpu)} if settings.local_mode else {"cpu": 0}
    trainable = ray.tune.with_resources(ray.tune.with_parameters(_run_trial, data=data, settings=settings),
                                        {**resources, "memory": TRIAL_MEMORY})
    verb = "Resuming" if config.resume else "Searching"
    console.print(f"[bold]{verb}[/] {search_dir.uri}: {config.trials} trials of up to {config.max_epochs} epochs, "
                  f"{concurrency} at a time, {config.workers_per_trial} worker(s) each "
                  f"({'GPU' if settings.use_gpu else 'CPU'}), {config.search} search, ASHA on validation accuracy "
                  f"({config.validation:,} held-out images)", soft_wrap=True)
    with SearchView(console, config.max_epochs, config.trials, lambda s: recipe(s, config.architecture)) as view:
        if config.resume:
            if not ray.tune.Tuner.can_restore(search_dir.uri):
                raise InputError(f"--resume: {search_dir.uri} holds no Tune experiment state to resume")
            tuner = ray.tune.Tuner.restore(search_dir.uri, trainable, resume_unfinished=True)
        else:
            tuner = ray.tune.Tuner(
                trainable,
                param_space=tune_space(space),
                tune_config=ray.tune.TuneConfig(
                    metric="val_accuracy", mode="max", num_samples=config.trials,
                    scheduler=ASHAScheduler(time_attr="epoch", max_t=config.max_epochs,
                                            grace_period=config.grace_period, reduction_factor=REDUCTION_FACTOR),
                    search_alg=_searcher(config, concurrency), max_concurrent_trials=concurrency,
                    trial_dirname_creator=_tune_dirname,
                ),
                run_config=ray.tune.RunConfig(
                    name=config.name, storage_path=StoragePath.parse(config.storage_path).uri,
                    callbacks=[view], verbose=0,
                    failure_config=ray.tune.FailureConfig(max_failures=0),  # a failing trial fails alone
                ),
            )
        tuner.fit()
        return view.ended_trials, view.running


def _searcher(config: SearchConfig, concurrency: int):
    if config.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=config.seed)  # Tune limits its concurrency to max_concurrent_trials
    return BasicVariantGenerator(random_state=config.seed, max_concurrent=concurrency)  # which ignores that


def _report(config: SearchConfig, settings: TrialSettings, rows: list[TrialRow], search_dir: StoragePath,
            console: Console) -> SearchResult:
    """The leaderboard, the best recipe as a command, and (--confirm) its test accuracy over seeds."""
    console.print(trials_table(rows[:LEADERBOARD_SHOWN], config.max_epochs,
                               title=f"Top {min(LEADERBOARD_SHOWN, len(rows))} of {len(rows)} trials "
                                     "by validation accuracy"))
    best = rows[0] if rows and rows[0].val_accuracy is not None else None
    if best is None:
        search_dir.write(BEST_CONFIG_FILE, json.dumps({"best": None, "reason": "every trial failed"}).encode())
        raise JobFailed(f"every trial failed; {search_dir.uri}/{LEADERBOARD_FILE} says why, one line each")
    command = train_command(trial_config(best.recipe, settings, best.trial), best.recipe)
    summary = {"trial": best.trial, "run_dir": best.run_dir, "val_accuracy": best.val_accuracy,
               "best_epoch": best.best_epoch, "epochs": best.epochs, "status": best.status,
               "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in best.recipe.items()},
               "train_command": command}
    console.print(f"[bold green]Best[/] {best.trial}: {100 * best.val_accuracy:.2f}% validation accuracy at epoch "
                  f"{best.best_epoch} ({recipe_text(best.recipe)})\nreproduce it with:\n  {command}\n"
                  f"leaderboard: {search_dir.uri}/{LEADERBOARD_FILE}", soft_wrap=True)
    confirmed = None
    if config.confirm:
        confirmed = _confirm(config, settings, best, search_dir, console)
        summary["confirmed"] = {"seeds": list(range(config.seed, config.seed + config.confirm)),
                                "test_accuracy": confirmed, "mean": statistics.mean(confirmed),
                                "sd": statistics.stdev(confirmed) if len(confirmed) > 1 else 0.0}
    search_dir.write(BEST_CONFIG_FILE, json.dumps(summary, indent=2).encode())
    return SearchResult(search_dir.uri, rows, best, command, confirmed)


def _confirm(config: SearchConfig, settings: TrialSettings, best: TrialRow, search_dir: StoragePath,
             console: Console) -> list[float]:
    """Retrain the best recipe on the whole training set (no validation split) with --confirm seeds;
    the final epoch's test accuracy of each: the honest figure of the recipe. With no held-out
    images there is nothing to stop early on: an --early-stopping recipe trains its whole budget."""
    console.rule(f"Confirming the best recipe on the full training set with {config.confirm} seed(s)")
    # One run at a time: on your own machine each may use every core (threads leave the recipe as it is).
    cores = int(ray.cluster_resources().get("CPU", 1)) // settings.workers_per_trial if is_embedded() else 0
    settings = replace(settings, validation=0, cpus_per_worker=max(settings.cpus_per_worker, cores))
    full_budget = {k: v for k, v in best.recipe.items() if k != "early_stopping"}
    accuracies = []
    for seed in range(config.seed, config.seed + config.confirm):
        name = f"confirm_seed{seed}"
        run = trial_config(full_budget, replace(settings, seed=seed), name)
        # A resumed search continues the confirm runs it was interrupted in, and keeps finished ones.
        run_dir = StoragePath.parse(settings.search_dir).child(name)
        history = read_history(run_dir)
        if len(history) >= run.epochs:
            console.print(f"{run_dir.uri}: finished before, {len(history)} epochs")
            accuracies.append(float(history[-1]["test_accuracy"]))
            continue
        result = train(replace(run, resume=run_dir.child(RUN_CONFIG_FILE).exists()), console,
                       local_mode=settings.local_mode)
        accuracies.append(result.history[-1]["test_accuracy"])
    sd = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    console.print(f"[bold green]Confirmed:[/] test accuracy {100 * statistics.mean(accuracies):.2f}% "
                  f"± {100 * sd:.2f} (mean ± sd of {len(accuracies)} seed(s), final epoch, full training set)")
    return accuracies
