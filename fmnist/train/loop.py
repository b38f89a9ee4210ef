"""What each Ray Train worker runs: the training loop, in torch.

Every epoch ends with exact global figures over the whole test set (and the held-out validation
images), a checkpoint and a report; rank 0 streams progress to the driver (a Ray queue, or in
local mode, where the loop runs in the driver's own process, a plain callback). Only the
processes that train import this module, and torch with it: the driver hands Ray Train
``fmnist.train.trainer.train_loop_per_worker``, which imports it where it runs.

In Ray Train's local mode nothing persists a reported checkpoint: rank 0 (the only worker) then
writes it into the run directory itself, and keeps ``keep`` of them as Ray Train would.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from fmnist.core.checkpoints import (
    METRICS_FILE, checkpoint_name, load_training_state, prune_checkpoints, save_checkpoint,
)
from fmnist.core.configs import learning_rate
from fmnist.core.model import Classifier, ModelConfig, normalize
from fmnist.core.run_layout import STOPPED_EARLY_COLUMN
from fmnist.core.storage import StoragePath
from fmnist.train.augment import augment


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _train_one_epoch(model, optimizer, images, labels, order, batch_size, smoothing, rank, world, on_batch,
                     prepare) -> float:
    """One pass over the training set (uint8 ``images``, each batch ``prepare``d: augmented and
    normalized); returns the global mean NLL loss.

    Step s trains on the global batch order[s*B:(s+1)*B], of which this rank takes every
    world-th sample. Each rank's loss is its sum over the global batch size times world, so
    DDP's gradient mean equals the gradient of the global batch's mean loss, for any world.
    With label smoothing e the loss minimised is (1 - e) * NLL + e * mean over classes of -log p.
    """
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=labels.device)  # no .item() per step: a GPU sync
    steps = math.ceil(len(order) / batch_size)
    for step in range(steps):
        batch = order[step * batch_size:(step + 1) * batch_size]
        mine = batch[rank::world]
        log_probs = model(prepare(images[mine]))
        nll = nn.functional.nll_loss(log_probs, labels[mine], reduction="sum")
        loss = (1 - smoothing) * nll - smoothing * log_probs.mean(dim=1).sum() if smoothing else nll
        optimizer.zero_grad(set_to_none=True)
        (loss * world / len(batch)).backward()
        optimizer.step()
        loss_sum += nll.detach()
        on_batch(step + 1, steps)
    (total,) = _all_reduce_sum([loss_sum.item()], labels.device)
    return total / len(order)


@torch.no_grad()
def _evaluate(model, images, labels, rank, world) -> tuple[float, float]:
    """Global mean NLL and accuracy over all of ``images`` (the test or validation set): per-rank sums, all-reduced."""
    model.eval()
    images, labels = images[rank::world], labels[rank::world]
    loss_sum, correct = 0.0, 0.0
    for start in range(0, len(images), 2000):
        log_probs = model(images[start:start + 2000])
        y = labels[start:start + 2000]
        loss_sum += nn.functional.nll_loss(log_probs, y, reduction="sum").item()
        correct += (log_probs.argmax(dim=1) == y).sum().item()
    loss_sum, correct, n = _all_reduce_sum([loss_sum, correct, float(len(images))], images.device)
    return loss_sum / n, correct / n


class _ProgressSender:
    """Rank 0's batch progress to the driver, a few times a second (each put is a round trip)."""

    def __init__(self, queue, epoch: int, enabled: bool):
        self.queue, self.epoch, self.enabled, self.last = queue, epoch, enabled, 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.2 or done == total):
            self.last = now
            self.queue.put_nowait(("batch", self.epoch, done, total))


def _epochs_without_gain(history: list[dict]) -> int:
    """Epochs since validation accuracy last reached a new best (0: it did this epoch)."""
    best = max(range(len(history)), key=lambda i: (history[i]["val_accuracy"], -i))  # the first to reach it
    return len(history) - 1 - best


def _epoch_of(checkpoint: ray.train.Checkpoint) -> int:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{METRICS_FILE}") as f:
        return json.loads(f.read())["epoch"]


def _resume_point(resume_from: str | None, under_ray_train: bool) -> ray.train.Checkpoint | None:
    """The checkpoint to continue from, of the later epoch: Ray Train's latest of this run (on a
    resume, or after a worker failure), or the run directory's latest, which the driver names
    (local mode writes checkpoints that Ray Train does not know of)."""
    candidates = [ray.train.get_checkpoint() if under_ray_train else None]
    if resume_from:
        where = StoragePath.parse(resume_from)
        candidates.append(ray.train.Checkpoint(where.path, filesystem=where.fs))
    candidates = [c for c in candidates if c is not None]
    return max(candidates, key=_epoch_of) if candidates else None


def _array(data):
    """An array of the loop config: in Ray's object store, or (local mode) the driver's own."""
    return ray.get(data) if isinstance(data, ray.ObjectRef) else data


def train_loop_per_worker(cfg: dict) -> None:
    """The training loop of one Ray Train worker, per ``cfg`` (fmnist.train.trainer._loop_config).

    With ``cfg["under_ray_train"]`` false the driver calls it itself, as the one worker of local mode
    (fmnist.train.trainer._fit_locally says why): it then reports to no one but the driver's progress callback."""
    if cfg["under_ray_train"]:
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
    else:
        rank, world = 0, 1
    torch.set_num_threads(cfg["threads"])
    model_config = ModelConfig.from_dict(cfg["model_config"])
    model, optimizer, first_epoch, history = _model_and_optimizer(cfg, model_config)
    device = next(model.parameters()).device
    bare_model = model.module if hasattr(model, "module") else model
    data = _tensors(cfg["data"], model_config, device)
    seed = cfg["seed"]
    for epoch in range(first_epoch, cfg["epochs"] + 1):
        # Every source of randomness is derived from (seed, epoch, rank): a resumed or restarted
        # epoch draws exactly what an uninterrupted run would have drawn.
        torch.manual_seed(seed * 100_003 + epoch * 1_009 + rank)  # dropout masks
        order = torch.randperm(len(data["train_y"]), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        draws = torch.Generator().manual_seed(seed * 100_003 + epoch * 1_009 + rank + 2**40)  # augmentation's

        def prepare(batch: torch.Tensor) -> torch.Tensor:
            return normalize(augment(batch, cfg["augment"], draws) if cfg["augment"] else batch, model_config)

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg["lr"], cfg["schedule"], epoch, cfg["epochs"])
        started = time.perf_counter()
        train_loss = _train_one_epoch(
            model, optimizer, data["train_x"], data["train_y"], order.to(device), cfg["batch_size"],
            cfg["label_smoothing"], rank, world, _ProgressSender(cfg["progress"], epoch, enabled=rank == 0), prepare,
        )
        row = _epoch_row(epoch, train_loss, time.perf_counter() - started, bare_model, data, rank, world)
        history.append(row)  # on every rank: each decides on an early stop alike, from all-reduced figures
        if cfg["early_stopping"]:
            row[STOPPED_EARLY_COLUMN] = int(_epochs_without_gain(history) >= cfg["early_stopping"])
        _checkpoint_and_report(cfg, row, history, bare_model, model_config, optimizer, rank, started)
        if rank == 0:
            row["epoch_seconds"] = time.perf_counter() - started  # now with the checkpoint written to storage
            cfg["progress"].put_nowait(("epoch", row, history))
        if row.get(STOPPED_EARLY_COLUMN):
            break


def _model_and_optimizer(cfg: dict, model_config: ModelConfig) -> tuple[nn.Module, torch.optim.Optimizer, int, list]:
    """The model on this worker's device (in DDP on Ray Train), its optimizer, the first epoch to train
    and the history so far: from the checkpoint to continue from, if any."""
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    model = Classifier(model_config)
    checkpoint = _resume_point(cfg["resume_from"], cfg["under_ray_train"])
    state = None
    if checkpoint:
        with checkpoint.as_directory() as d:
            weights, state = load_training_state(Path(d))
            model.load_state_dict(weights)
    if cfg["local_mode"]:  # one process, no Ray: no DDP, and the device is this machine's
        model = model.to(torch.device("cuda" if cfg["use_gpu"] else "cpu"))
    else:
        model = ray.train.torch.prepare_model(model)  # moves to device, wraps in DDP when world > 1
    # Made after the move: loading a state dict puts the optimizer's state on its parameters' device.
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if state is None:
        return model, optimizer, 1, []
    optimizer.load_state_dict(state["optimizer"])
    return model, optimizer, state["epoch"] + 1, state["history"]


def _tensors(data: dict, model_config: ModelConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """The loop config's arrays as tensors on ``device``: train_x/y, test_x/y, and val_x/y with a validation split.

    torch.tensor copies: the object store's arrays are read-only. The training images stay uint8
    (a quarter of float32's memory), each batch augmented and normalized as it is drawn.
    """
    tensors = {"train_x": torch.tensor(_array(data["train_images"])).to(device),
               "train_y": torch.tensor(_array(data["train_labels"])).to(device)}
    for split in ("test", "val"):
        if f"{split}_images" in data:
            tensors[f"{split}_x"] = normalize(torch.tensor(_array(data[f"{split}_images"])), model_config).to(device)
            tensors[f"{split}_y"] = torch.tensor(_array(data[f"{split}_labels"])).to(device)
    return tensors


def _epoch_row(epoch: int, train_loss: float, train_seconds: float, model: nn.Module, data: dict[str, torch.Tensor],
               rank: int, world: int) -> dict:
    """The epoch's figures: training loss and speed, test (and validation) loss and accuracy."""
    test_loss, test_accuracy = _evaluate(model, data["test_x"], data["test_y"], rank, world)
    row = {
        "epoch": epoch, "train_loss": train_loss, "test_loss": test_loss, "test_accuracy": test_accuracy,
        "train_seconds": train_seconds, "epoch_seconds": 0.0,
        "samples_per_second": len(data["train_y"]) / train_seconds,
    }
    if "val_x" in data:
        row["val_loss"], row["val_accuracy"] = _evaluate(model, data["val_x"], data["val_y"], rank, world)
    return row


def _checkpoint_and_report(cfg: dict, row: dict, history: list[dict], model: nn.Module, model_config: ModelConfig,
                           optimizer: torch.optim.Optimizer, rank: int, started: float) -> None:
    """Rank 0 writes the epoch's checkpoint: into the run directory itself in local mode (nothing there
    persists a reported one), else for Ray Train to persist with the report every rank makes."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            row["epoch_seconds"] = time.perf_counter() - started  # what metrics.json records
            state = {"optimizer": optimizer.state_dict(), "epoch": row["epoch"], "seed": cfg["seed"],
                     "history": history}
            if cfg["local_mode"]:  # written once, where it stays
                run_dir = StoragePath.parse(cfg["run_dir"])
                save_checkpoint(run_dir.child(checkpoint_name()), model, model_config, row, state)
                prune_checkpoints(run_dir, cfg["keep"], by_validation="val_accuracy" in row)
            else:
                save_checkpoint(StoragePath.parse(tmp), model, model_config, row, state)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
        if cfg["under_ray_train"]:
            ray.train.report(row, checkpoint=ckpt)
