"""Data-parallel training of the classifier on Ray Train: the driver's side.

On one's own machine with one worker (the default there) the run uses Ray Train's local mode:
the training loop (fmnist.train.loop) runs in this process, no Ray instance is started, and each
epoch's figures reach the driver's files by a plain call. Everywhere else (--num-workers N,
RAY_ADDRESS: a cluster or `ray job submit`) it is Ray Train's stock TorchTrainer: the driver puts
the data in Ray's object store once, the workers train, and rank 0 streams its progress to the
driver through a Ray queue. Either way the run directory looks the same, and the driver writes
history.csv, the loss curve and the tracking as epochs end.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import ray
import ray.train
from rich.console import Console

from fmnist.core.checkpoints import METRICS_FILE, best_checkpoint, latest_checkpoint
from fmnist.core.cluster import quiet_ray_logs, start_ray
from fmnist.core.configs import TrainConfig, learning_rate
from fmnist.core.data import FashionMNIST, load_fashion_mnist, validation_split
from fmnist.core.errors import InputError, JobFailed, error_line
from fmnist.core.run_layout import LOSS_CURVE_FILE, RUN_CONFIG_FILE, stopped_early
from fmnist.core.signals import signal_handler
from fmnist.core.storage import StoragePath
from fmnist.core.tracking import TrainingTracker, check_mlflow
from fmnist.train.placement import check_batch_splits, place_locally, place_on_cluster, runs_in_local_mode
from fmnist.train.progress import ProgressDrawer, RunFiles
from fmnist.train.report import TrainingConsole, loss_curve_png
from fmnist.train.run_dir import RECIPE_FIELDS, count, pick_run_dir


@dataclass
class TrainResult:
    run_dir: str
    best_checkpoint: str  # what `--checkpoint RUN` means: the best by validation accuracy, else the last
    best_accuracy: float  # its test accuracy
    history: list[dict]
    startup_seconds: float | None  # from train() to the first epoch's start; None if none ran


def train_loop_per_worker(cfg: dict) -> None:
    """What each Ray Train worker runs: fmnist.train.loop, imported there, as only the workers need torch."""
    from fmnist.train.loop import train_loop_per_worker as run_loop

    run_loop(cfg)


@contextlib.contextmanager
def _resume_hint(console: Console, config: TrainConfig):
    """On Ctrl-C, say how to pick the run up again (Ray is stopped by the caller)."""
    try:
        yield
    except KeyboardInterrupt:
        console.print(
            f"[yellow]Interrupted.[/] Continue with: --resume --storage-path {config.storage_path} --name {config.name}"
        )
        raise


def _failures(error: ray.train.TrainingFailedError) -> str:
    """What each failed worker (or the controller) raised: the last line of its error."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        return "; ".join(f"worker {rank}: {error_line(e)[:200]}" for rank, e in sorted(failures.items()))
    return error_line(getattr(error, "controller_failure", error))[:200]


def train(config: TrainConfig, console: Console | None = None, *, data: FashionMNIST | None = None,
          callbacks: Sequence[ray.train.UserCallback] = (), local_mode: bool | None = None,
          tune_trial: bool = False) -> TrainResult:
    """Train per ``config``; returns where the run and its best checkpoint are.

    ``local_mode``: Ray Train's local mode (None: where runs_in_local_mode says so). A search's
    trial passes the ``data`` its driver read, and reports each epoch to Ray Tune: in local mode as
    ``tune_trial``, on Ray Train's workers by ``callbacks``.
    """
    console = console or Console()
    called_at = time.perf_counter()
    check_mlflow(config.mlflow)
    run_dir, config = pick_run_dir(config)
    check_batch_splits(config)  # with --num-workers given, before Ray starts
    if data is None:
        data = load_fashion_mnist(config.data_dir)  # validated before any worker starts
    if local_mode is None:
        local_mode = runs_in_local_mode(config)
    quiet_ray_logs(config.verbose)
    started_ray = False if local_mode else start_ray(config.verbose)
    try:
        config, why = place_locally(config) if local_mode else (place_on_cluster(config, console), "")
        # Also on a resume: it keeps a new --epochs for the next resume, and marks the latest run.
        run_dir.write(RUN_CONFIG_FILE, json.dumps(asdict(config), indent=2).encode())
        recipe = {k: getattr(config, k) for k in RECIPE_FIELDS}
        lr = functools.partial(learning_rate, config.lr, config.schedule, epochs=config.epochs)  # of an epoch
        with TrainingTracker(run_dir, config.name, recipe, lr, config.mlflow) as tracker:
            _say_where(console, config, run_dir, local_mode, why)
            with TrainingConsole(console, config.epochs) as view, _resume_hint(console, config):
                files = RunFiles(view, run_dir, tracker, called_at, _report_to_tune if tune_trial else None)
                try:
                    if local_mode:
                        _fit_locally(config, run_dir, data, files, tune_trial)
                    else:
                        _fit_on_ray(config, run_dir, data, files, callbacks)
                finally:
                    # Drawn once at the end (also of an interrupted run): matplotlib on every epoch
                    # takes CPU from the workers on a small machine.
                    if files.history:
                        run_dir.write(LOSS_CURVE_FILE, loss_curve_png(files.history))
            return _finish(config, run_dir, files, tracker, console)
    finally:
        if started_ray:
            ray.shutdown()


def _say_where(console: Console, config: TrainConfig, run_dir: StoragePath, local_mode: bool, why: str) -> None:
    where = "GPU" if config.use_gpu else f"CPU, {count(config.cpus_per_worker, 'thread')}"
    where += " each" * (config.num_workers > 1 and not config.use_gpu) + (f"; {why}" if why else "")
    verb = "Resuming" if config.resume else "Training"
    mode = " in Ray Train's local mode" if local_mode else ""
    console.print(f"[bold]{verb}[/] {run_dir.uri}: {count(config.epochs, 'epoch')} on "
                  f"{count(config.num_workers, 'worker')}{mode} ({where})")


def _report_to_tune(row: dict) -> None:
    """A search's local-mode trial: each epoch to Ray Tune, once it is in the trial's history.csv."""
    import ray.tune

    ray.tune.report(row)


def _loop_config(config: TrainConfig, run_dir: StoragePath, data: FashionMNIST, progress, local_mode: bool,
                 under_ray_train: bool = True) -> dict:
    """What the training loop gets: the data (Ray object refs, or in local mode the arrays
    themselves), the recipe, and where to continue from and report to."""
    arrays = {k: getattr(data, k) for k in ("train_images", "train_labels", "test_images", "test_labels")}
    if config.validation:
        kept, held_out = validation_split(data.train_labels, config.validation, config.seed)
        arrays.update(train_images=data.train_images[kept], train_labels=data.train_labels[kept],
                      val_images=data.train_images[held_out], val_labels=data.train_labels[held_out])
    resume_from = latest_checkpoint(run_dir) if config.resume else None
    return {
        "data": arrays if local_mode else {k: ray.put(v) for k, v in arrays.items()},
        "model_config": config.model_config().to_dict(),
        "threads": config.cpus_per_worker, "use_gpu": config.use_gpu, "progress": progress,
        "local_mode": local_mode, "under_ray_train": under_ray_train, "run_dir": run_dir.uri, "keep": config.keep,
        "resume_from": resume_from.uri if resume_from else None,
        **{k: getattr(config, k) for k in RECIPE_FIELDS},
    }


def _trainer(config: TrainConfig, loop_config: dict, callbacks: Sequence[ray.train.UserCallback]):
    from ray.train.torch import TorchTrainer

    local_mode = loop_config["local_mode"]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        # num_workers=0 is Ray Train's local mode: the loop runs in this process.
        scaling_config=ray.train.ScalingConfig(
            num_workers=0 if local_mode else config.num_workers, use_gpu=config.use_gpu and not local_mode,
            resources_per_worker=None if local_mode else {"CPU": config.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=StoragePath.parse(config.storage_path).uri,
            # Chosen on validation accuracy, never on the test set: without a validation split, the latest.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.keep, checkpoint_score_attribute="val_accuracy" if config.validation else None,
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            callbacks=list(callbacks),
        ),
    )


def _fit_locally(config: TrainConfig, run_dir: StoragePath, data: FashionMNIST, files: RunFiles,
                 tune_trial: bool) -> None:
    """Ray Train's local mode: the loop runs here and calls ``files`` itself; its errors are this
    process's (a failure to write the run's files stops the run at once).

    Shim: in a Ray Tune trial, Ray refuses ray.train.get_context/report/get_checkpoint even in local
    mode (a DeprecationWarning pointing to ray-project/ray#49454): there the loop is called as local
    mode would call it, without them. tests/test_tune.py fails once Ray lets local mode run in a trial.
    """
    loop_config = _loop_config(config, run_dir, data, files, local_mode=True, under_ray_train=not tune_trial)
    try:
        if tune_trial:
            train_loop_per_worker(loop_config)
        else:
            _trainer(config, loop_config, ()).fit()
    except (InputError, KeyboardInterrupt):
        raise
    except Exception as e:  # as a worker's failure on Ray: the run continues from its last checkpoint
        raise JobFailed(f"training failed ({error_line(e)[:200]}); after fixing the cause, continue from the last "
                        f"checkpoint with --resume --storage-path {config.storage_path} --name {config.name}") from e


def _fit_on_ray(config: TrainConfig, run_dir: StoragePath, data: FashionMNIST, files: RunFiles,
                callbacks: Sequence[ray.train.UserCallback]) -> None:
    """Ray Train's workers train; their progress comes through a Ray queue that a thread hands to ``files``."""
    import ray.util.queue

    progress = ray.util.queue.Queue(actor_options={"num_cpus": 0})
    trainer = _trainer(config, _loop_config(config, run_dir, data, progress, local_mode=False), callbacks)
    # Ray Train's handler, which fit() installs on the main thread, stays after it: put back the one before.
    with signal_handler(signal.SIGINT) as on_main_thread:
        # The drawer stops the run as Ctrl-C does, through Ray Train's handler (on the main thread only;
        # elsewhere, as in a search's trial, the run's own writes to the same storage fail it).
        drawer = ProgressDrawer(progress, files, functools.partial(signal.raise_signal, signal.SIGINT)
                                if on_main_thread else None)
        drawer.start()
        fit_error = None
        try:
            # On Ctrl-C, Ray Train's handler aborts the run, workers first, and fit() returns.
            trainer.fit()
        except BaseException as e:
            fit_error = e
        finally:
            drawer.finish()  # no thread is left in a Ray call when Ray shuts down: that would crash the process
            progress.shutdown(force=True)  # drained; its actor would outlive the run in a Ray session that goes on
    if drawer.error is not None:
        raise drawer.error
    if isinstance(fit_error, ray.train.TrainingFailedError):
        raise JobFailed(f"training failed ({_failures(fit_error)}); after fixing the cause, continue "
                        f"from the last checkpoint with --resume --storage-path {config.storage_path} "
                        f"--name {config.name}") from fit_error
    if isinstance(fit_error, SystemExit):
        # Ray Train's handler ends the process (sys.exit) when its abort finds the controller gone.
        raise KeyboardInterrupt
    if fit_error is not None:
        raise fit_error
    if not files.history or (files.history[-1]["epoch"] < config.epochs and not stopped_early(files.history)):
        raise KeyboardInterrupt  # fit() returned before the last epoch: Ray Train's handler aborted the run


def _finish(config: TrainConfig, run_dir: StoragePath, files: RunFiles, tracker: TrainingTracker,
            console: Console) -> TrainResult:
    """The run's best checkpoint as `--checkpoint RUN` will pick it, said and tracked."""
    best = best_checkpoint(run_dir)
    metrics = json.loads(best.read_text(METRICS_FILE))
    if config.validation:
        chosen = (f"best validation accuracy {100 * metrics['val_accuracy']:.2f}% at epoch {metrics['epoch']} "
                  f"(test accuracy {100 * metrics['test_accuracy']:.2f}%)")
    else:
        chosen = f"test accuracy {100 * metrics['test_accuracy']:.2f}% at the last epoch ({metrics['epoch']})"
    if stopped_early(files.history):
        chosen = (f"stopped early at epoch {files.history[-1]['epoch']} of {config.epochs}: no better validation "
                  f"accuracy for {count(config.early_stopping, 'epoch')}; {chosen}")
    tracker.finish(best)
    console.print(
        f"[bold green]Done.[/] {chosen}\nbest checkpoint: {best.uri}\nrun directory:   {run_dir.uri}",
        soft_wrap=True,  # a path a user copies stays on one line
    )
    return TrainResult(run_dir.uri, best.uri, metrics["test_accuracy"], files.history, files.startup_seconds)
