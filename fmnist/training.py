"""Data-parallel training of the classifier on Ray Train: the driver's side.

On one's own machine with one worker (the default there) the run uses Ray Train's local mode:
the training loop (fmnist.train_loop) runs in this process, no Ray instance is started, and each
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
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Callable, Sequence

import ray
import ray.train
from rich.console import Console

from fmnist.checkpoints import METRICS_FILE, best_checkpoint, latest_checkpoint
from fmnist.cluster import is_embedded, one_per_gpu, quiet_ray_logs, start_ray, wait_for_resources
from fmnist.data import FashionMNIST, load_fashion_mnist, validation_split
from fmnist.errors import InputError, JobFailed
from fmnist.run_configs import CPU_WORKERS, DEFAULT_EPOCHS, TrainConfig, learning_rate
from fmnist.run_layout import HISTORY_FILE, LOSS_CURVE_FILE, RUN_CONFIG_FILE, read_history, stopped_early
from fmnist.storage import StoragePath, check_run_name
from fmnist.tracking import TrainingTracker, check_mlflow
from fmnist.training_report import TrainingConsole, history_csv, loss_curve_png

# Options that define what is trained; a resumed run keeps the ones it started with.
RECIPE_FIELDS = (
    "epochs", "lr", "batch_size", "hidden", "activation", "dropout", "weight_decay", "label_smoothing", "schedule",
    "seed", "validation", "augment", "early_stopping",
)
# Where it ran; a resumed run keeps these too unless told otherwise, since other workers draw
# other dropout masks (and other threads round differently).
PLACEMENT_FIELDS = ("num_workers", "use_gpu", "cpus_per_worker")
# What runs from before these options used.
NEWER_RECIPE_DEFAULTS = {"activation": "relu", "validation": 0, "augment": [], "early_stopping": 0}


@dataclass
class TrainResult:
    run_dir: str
    best_checkpoint: str  # what `--checkpoint RUN` means: the best by validation accuracy, else the last
    best_accuracy: float  # its test accuracy
    history: list[dict]
    startup_seconds: float | None  # from train() to the first epoch's start; None if none ran


def train_loop_per_worker(cfg: dict) -> None:
    """What each Ray Train worker runs: fmnist.train_loop, imported there, as only the workers need torch."""
    from fmnist.train_loop import train_loop_per_worker as run_loop

    run_loop(cfg)


def _pick_run_dir(config: TrainConfig) -> tuple[StoragePath, TrainConfig]:
    """The run directory, and the config to run with (a resumed run's own recipe)."""
    storage = StoragePath.parse(config.storage_path)
    if storage.is_file():
        raise InputError(f"--storage-path {storage.uri} is a file; pass a directory (it is made if missing)")
    name = config.name
    if config.resume and name is None:
        configs = [storage.child(d).child(RUN_CONFIG_FILE) for d in storage.subdirectories()]
        started = {c.path: c.fs.get_file_info(c.path).mtime for c in configs if c.exists()}  # written on each (re)start
        if not started:
            raise InputError(f"--resume: no run to resume in {storage.uri}; pass --storage-path/--name")
        name = max(started, key=started.get).split("/")[-2]
    if name is None:
        name = datetime.now().strftime("train-%Y%m%d-%H%M%S")
    check_run_name(name)
    run_dir = storage.child(name)
    if not config.resume:
        if run_dir.exists():
            raise InputError(f"run directory {run_dir.uri} exists; pass --resume to continue it, or another --name")
        return run_dir, replace(config, name=name, epochs=config.epochs or DEFAULT_EPOCHS)
    if not run_dir.child(RUN_CONFIG_FILE).exists():
        raise InputError(f"--resume: {run_dir.uri} is not a run directory (no {RUN_CONFIG_FILE})")
    try:
        saved = json.loads(run_dir.read_text(RUN_CONFIG_FILE))
        saved = {**NEWER_RECIPE_DEFAULTS, **saved}
        recipe = {k: saved[k] for k in RECIPE_FIELDS if k != "epochs"}
        recipe["hidden"], recipe["augment"] = tuple(recipe["hidden"]), tuple(recipe["augment"])
        # --epochs on a resume may extend the run; otherwise it ends where it was meant to.
        epochs = config.epochs or int(saved["epochs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--resume: {run_dir.uri}/{RUN_CONFIG_FILE} is damaged ({type(e).__name__}: {e}); "
                         "start a new run instead") from None
    _warn_ignored_recipe(config, recipe)
    placement = {k: saved[k] for k in PLACEMENT_FIELDS if getattr(config, k) is None and saved.get(k) is not None}
    _note_changed_placement(config, saved)
    history = read_history(run_dir)
    done = len(history)
    if stopped_early(history):
        raise InputError(f"--resume: {run_dir.uri} stopped early at epoch {done} (no better validation accuracy "
                         f"for {_count(saved['early_stopping'], 'epoch')}); its best checkpoint is the run's. Start "
                         "a new run to train on")
    if done >= epochs:
        raise InputError(f"--resume: {run_dir.uri} has finished {done} epochs; pass --epochs N (more than {done}) "
                         "to train it further")
    return run_dir, replace(config, name=name, epochs=epochs, **recipe, **placement)


def _warn_ignored_recipe(config: TrainConfig, recipe: dict) -> None:
    """A resumed run keeps its recipe: say so for options given that would change it."""
    defaults = TrainConfig()
    ignored = [k for k, v in recipe.items() if getattr(config, k) not in (v, getattr(defaults, k))]
    if ignored:
        options = ", ".join("--" + k.replace("_", "-") for k in ignored)
        print(f"note: a resumed run keeps its recipe; ignoring {options}", file=sys.stderr)


def _note_changed_placement(config: TrainConfig, saved: dict) -> None:
    """A resumed run given other workers, GPU use or threads than it started with: say what that costs."""
    changed = [k for k in PLACEMENT_FIELDS if getattr(config, k) is not None and getattr(config, k) != saved.get(k)]
    if changed:
        given = ", ".join(f"{k} {saved.get(k)} -> {getattr(config, k)}" for k in changed)
        print(f"note: resuming on another placement than the run started with ({given}); its figures will "
              "differ from an uninterrupted run's", file=sys.stderr)


def runs_in_local_mode(config: TrainConfig) -> bool:
    """Whether ``config`` trains in Ray Train's local mode: one worker on one's own machine (no
    RAY_ADDRESS, and no Ray instance in this process already)."""
    return config.num_workers in (None, 1) and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()


def _placed_locally(config: TrainConfig) -> tuple[TrainConfig, str]:
    """``config`` placed on this machine: one worker, its GPU where it has one, every core as torch threads."""
    import torch

    has_gpu = torch.cuda.is_available()
    if config.use_gpu and not has_gpu:
        raise InputError("--use-gpu: this machine has no GPU that torch can use; pass --no-gpu, or run on a "
                         "cluster with RAY_ADDRESS")
    use_gpu = has_gpu if config.use_gpu is None else config.use_gpu
    cores = os.cpu_count() or 1
    cpus = config.cpus_per_worker or cores
    if cpus > cores:
        raise InputError(f"training with 1 worker needs {cpus} CPU but this machine has {cores} CPU; ask for fewer "
                         "(--num-workers, --cpus-per-worker)")
    why = "no Ray instance: one worker with every core is the fastest on one machine; --num-workers N for DDP"
    return replace(config, use_gpu=use_gpu, num_workers=1, cpus_per_worker=cpus), why


def _placed(config: TrainConfig) -> TrainConfig:
    """``config`` with what it left to the cluster decided: GPUs or not, workers, CPUs (= torch threads) each."""
    total = ray.cluster_resources()
    use_gpu = config.use_gpu if config.use_gpu is not None else total.get("GPU", 0) > 0
    workers = config.num_workers or (one_per_gpu() if use_gpu else CPU_WORKERS)
    cpus = config.cpus_per_worker
    if cpus is None:
        # On an embedded local Ray the workers may as well share all cores; on a cluster keep
        # Ray Train's default of 1 so that workers pack onto nodes.
        cpus = max(1, int(total.get("CPU", 1)) // workers) if is_embedded() else 1
    return replace(config, use_gpu=use_gpu, num_workers=workers, cpus_per_worker=cpus)


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'s' * (n != 1)}"


def _check_batch_splits(config: TrainConfig) -> None:
    if config.num_workers and config.batch_size < config.num_workers:
        raise InputError(f"--batch-size {config.batch_size} is smaller than --num-workers {config.num_workers}; "
                         "each worker needs a sample of every batch")


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


def _last_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


def _failures(error: ray.train.TrainingFailedError) -> str:
    """What each failed worker (or the controller) raised: the last line of its error."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        return "; ".join(f"worker {rank}: {_last_line(e)}" for rank, e in sorted(failures.items()))
    return _last_line(getattr(error, "controller_failure", error))


class _RunFiles:
    """What the driver does with each event rank 0 sends: draws the progress, and as an epoch ends
    writes history.csv, tracks the figures and tells ``on_epoch`` (a search's trial reports to Tune)."""

    def __init__(self, view: TrainingConsole, run_dir: StoragePath, tracker: TrainingTracker, called_at: float,
                 on_epoch: Callable[[dict], None] | None):
        self.view, self.run_dir, self.tracker, self.called_at, self.on_epoch = view, run_dir, tracker, called_at, on_epoch
        self.history: list[dict] = []
        self.startup_seconds: float | None = None

    def put_nowait(self, event: tuple) -> None:
        """One event (as a queue takes it: local mode's loop calls this directly)."""
        if event[0] == "batch":
            self.view.batch(*event[1:])
            return
        _, row, self.history = event
        if self.startup_seconds is None:
            self.startup_seconds = time.perf_counter() - self.called_at - row["epoch_seconds"]
        self.view.epoch_done(row)
        self.run_dir.write(HISTORY_FILE, history_csv(self.history).encode())
        self.tracker.epochs(self.history)
        if self.on_epoch:
            self.on_epoch(row)


class _ProgressDrawer(threading.Thread):
    """Hands the events of a Ray queue to ``_RunFiles`` beside fit(), which keeps the calling thread
    (the main one on the command line, where Ctrl-C lands). A failure to write the run's files is
    kept for the caller, and stops the run with ``abort_run`` where there is one."""

    def __init__(self, progress, files: _RunFiles, abort_run: Callable[[], None] | None):
        super().__init__(daemon=True)
        self.progress, self.files, self.abort_run = progress, files, abort_run
        self.error: BaseException | None = None
        self._fit_returned = threading.Event()

    def run(self) -> None:
        while not (self._fit_returned.is_set() and self.progress.empty()):
            try:
                event = self.progress.get(timeout=0.2)
            except queue.Empty:  # ray.util.queue.Empty is one
                continue
            if self.error is None:
                try:
                    self.files.put_nowait(event)
                except BaseException as e:
                    self.error = e
                    if self.abort_run:
                        self.abort_run()

    def finish(self) -> None:
        """Returns once every event the run sent is handled: Ray may then shut down."""
        self._fit_returned.set()
        self.join()


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
    run_dir, config = _pick_run_dir(config)
    _check_batch_splits(config)  # with --num-workers given, before Ray starts
    if data is None:
        data = load_fashion_mnist(config.data_dir)  # validated before any worker starts
    if local_mode is None:
        local_mode = runs_in_local_mode(config)
    quiet_ray_logs(config.verbose)
    started_ray = False if local_mode else start_ray(config.verbose)
    try:
        if local_mode:
            config, why = _placed_locally(config)
        else:
            config, why = _placed(config), ""
            _check_batch_splits(config)  # with the worker count the cluster decided
            workers = config.num_workers
            remedy = "ask for fewer (--num-workers, --cpus-per-worker)" + (" or --no-gpu" if config.use_gpu else "")
            wait_for_resources({"CPU": config.cpus_per_worker, "GPU": int(config.use_gpu)}, workers,
                               f"training with {_count(workers, 'worker')}", remedy,
                               0 if is_embedded() else config.resource_timeout_s, console)
        # Also on a resume: it keeps a new --epochs for the next resume, and marks the latest run.
        run_dir.write(RUN_CONFIG_FILE, json.dumps(asdict(config), indent=2).encode())
        recipe = {k: getattr(config, k) for k in RECIPE_FIELDS}
        lr = functools.partial(learning_rate, config.lr, config.schedule, epochs=config.epochs)  # of an epoch
        with TrainingTracker(run_dir, config.name, recipe, lr, config.mlflow) as tracker:
            where = "GPU" if config.use_gpu else f"CPU, {_count(config.cpus_per_worker, 'thread')}"
            where += " each" * (config.num_workers > 1 and not config.use_gpu) + (f"; {why}" if why else "")
            verb = "Resuming" if config.resume else "Training"
            mode = " in Ray Train's local mode" if local_mode else ""
            console.print(f"[bold]{verb}[/] {run_dir.uri}: {_count(config.epochs, 'epoch')} on "
                          f"{_count(config.num_workers, 'worker')}{mode} ({where})")
            with TrainingConsole(console, config.epochs) as view, _resume_hint(console, config):
                files = _RunFiles(view, run_dir, tracker, called_at, _report_to_tune if tune_trial else None)
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


def _fit_locally(config: TrainConfig, run_dir: StoragePath, data: FashionMNIST, files: _RunFiles,
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
        raise JobFailed(f"training failed ({_last_line(e)}); after fixing the cause, continue from the last "
                        f"checkpoint with --resume --storage-path {config.storage_path} --name {config.name}") from e


def _fit_on_ray(config: TrainConfig, run_dir: StoragePath, data: FashionMNIST, files: _RunFiles,
                callbacks: Sequence[ray.train.UserCallback]) -> None:
    """Ray Train's workers train; their progress comes through a Ray queue that a thread hands to ``files``."""
    import ray.util.queue

    progress = ray.util.queue.Queue(actor_options={"num_cpus": 0})
    trainer = _trainer(config, _loop_config(config, run_dir, data, progress, local_mode=False), callbacks)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigint = signal.getsignal(signal.SIGINT) if on_main_thread else None
    # The drawer stops the run as Ctrl-C does, through Ray Train's handler (on the main thread only;
    # elsewhere, as in a search's trial, the run's own writes to the same storage fail it).
    drawer = _ProgressDrawer(progress, files, functools.partial(signal.raise_signal, signal.SIGINT)
                             if on_main_thread else None)
    drawer.start()
    fit_error = None
    try:
        # On Ctrl-C, Ray Train's handler (which fit() installs on the main thread) aborts the run,
        # workers first, and fit() returns.
        trainer.fit()
    except BaseException as e:
        fit_error = e
    finally:
        if on_main_thread:
            signal.signal(signal.SIGINT, previous_sigint)  # Ray Train leaves its handler installed
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


def _finish(config: TrainConfig, run_dir: StoragePath, files: _RunFiles, tracker: TrainingTracker,
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
                  f"accuracy for {_count(config.early_stopping, 'epoch')}; {chosen}")
    tracker.finish(best)
    console.print(
        f"[bold green]Done.[/] {chosen}\nbest checkpoint: {best.uri}\nrun directory:   {run_dir.uri}",
        soft_wrap=True,  # a path a user copies stays on one line
    )
    return TrainResult(run_dir.uri, best.uri, metrics["test_accuracy"], files.history, files.startup_seconds)
