"""Augmentation (--augment) and early stopping (--early-stopping): what they do to a known image,
that a run stays reproducible and resumable with them, and that an early stop is said and kept."""

from __future__ import annotations

import pytest
import torch

from fmnist.cli import main
from fmnist.core.configs import TrainConfig, augmentations_text, parse_augmentations
from fmnist.core.data import load_fashion_mnist
from fmnist.train.augment import MAX_SHIFT, augment
from fmnist.train.trainer import train

from conftest import one_error_line, tensorboard_scalars
from test_training import read_history


@pytest.fixture(scope="module")
def images(real_data_dir) -> torch.Tensor:
    """Real training images: 64 of them, uint8 (N, 28, 28)."""
    return torch.from_numpy(load_fashion_mnist(real_data_dir).train_images[:64].copy())


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` moved down dy and right dx pixels, the background (0) filling in: by hand."""
    out = torch.zeros_like(image)
    h, w = image.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[max(-dy, 0):h - max(dy, 0),
                                                                      max(-dx, 0):w - max(dx, 0)]
    return out


def test_flip_mirrors_about_half_the_images_and_changes_nothing_else(images):
    out = augment(images, ("flip",), torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    mirrored = [torch.equal(o, x.flip(1)) for o, x in zip(out, images)]
    kept = [torch.equal(o, x) for o, x in zip(out, images)]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 16 <= sum(m and not k for m, k in zip(mirrored, kept)) <= 48


def test_shift_moves_each_image_by_at_most_two_pixels_filling_with_the_background(images):
    out = augment(images, ("shift",), torch.Generator().manual_seed(0))
    offsets = [(dy, dx) for dy in range(-MAX_SHIFT, MAX_SHIFT + 1) for dx in range(-MAX_SHIFT, MAX_SHIFT + 1)]
    found = set()
    for o, x in zip(out, images):
        matches = [d for d in offsets if torch.equal(o, shifted(x, *d))]
        assert matches, "not a shift of its image by up to 2 pixels"
        found.add(matches[0])
    assert len(found) >= 10  # offsets vary from image to image

    # One known pixel: a single bright dot lands exactly where its image's offset says.
    dot = torch.zeros(1, 28, 28, dtype=torch.uint8)
    dot[0, 10, 10] = 255
    moved = augment(dot, ("shift",), torch.Generator().manual_seed(3))[0]
    (y, x), = moved.nonzero().tolist()
    assert abs(y - 10) <= MAX_SHIFT and abs(x - 10) <= MAX_SHIFT and moved.sum() == 255


def test_erase_only_blanks_pixels_and_the_same_seed_gives_the_same_batches(images):
    names = parse_augmentations("erase,shift,flip")
    assert names == ("flip", "shift", "erase") and augmentations_text(names) == "flip,shift,erase"
    erased = augment(images, ("erase",), torch.Generator().manual_seed(0))
    assert ((erased == images) | (erased == 0)).all()
    assert (erased != images).any()
    first = augment(images, names, torch.Generator().manual_seed(5))
    again = augment(images, names, torch.Generator().manual_seed(5))
    other = augment(images, names, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_an_augmented_run_resumed_equals_an_uninterrupted_one_and_keeps_its_augmentation(
        ray_session, real_data_dir, tmp_path):
    recipe = dict(hidden=(64,), augment=("flip", "shift", "erase"), validation=2000, seed=3,
                  storage_path=str(tmp_path), data_dir=str(real_data_dir))
    whole = train(TrainConfig(epochs=2, name="whole", **recipe), local_mode=True)
    train(TrainConfig(epochs=1, name="cut", **recipe), local_mode=True)
    resumed = train(TrainConfig(epochs=2, name="cut", resume=True, storage_path=str(tmp_path),
                                data_dir=str(real_data_dir)), local_mode=True)
    for got, want in zip(resumed.history, whole.history, strict=True):
        for key in ("train_loss", "test_loss", "val_accuracy"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["epoch"], key)
    plain = train(TrainConfig(epochs=1, name="plain", **{**recipe, "augment": ()}), local_mode=True)
    assert plain.history[0]["train_loss"] != pytest.approx(whole.history[0]["train_loss"], rel=1e-3)


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_early_stopping_stops_when_validation_accuracy_stalls_says_so_and_a_resume_keeps_to_it(
        ray_session, real_data_dir, tmp_path, capsys, workers):
    # A learning rate far below float32's resolution of the weights: they never change, so
    # validation accuracy is the same every epoch and never improves after epoch 1.
    options = ["--lr", "1e-12", "--hidden", "32", "--validation", "1000", "--early-stopping", "2",
               "--num-workers", str(workers), "--storage-path", str(tmp_path), "--name", "r",
               "--data-dir", str(real_data_dir)]
    assert main(["train", *options, "--epochs", "2"]) == 0  # too short to stop
    assert [r["stopped_early"] for r in read_history(tmp_path / "r")] == ["0", "0"]
    resume = ["train", "--resume", "--storage-path", str(tmp_path), "--name", "r", "--data-dir", str(real_data_dir)]
    capsys.readouterr()
    assert main([*resume, "--epochs", "10"]) == 0  # patience counts epochs 2 and 3: it stops at 3
    history = read_history(tmp_path / "r")
    assert [(r["epoch"], r["stopped_early"]) for r in history] == [("1", "0"), ("2", "0"), ("3", "1")]
    assert len({r["val_accuracy"] for r in history}) == 1
    out = " ".join(capsys.readouterr().out.split())  # as rich wrapped it, unwrapped
    assert "stopped early at epoch 3 of 10: no better validation accuracy for 2 epochs; best validation" in out
    assert tensorboard_scalars(tmp_path / "r")["stopped_early"] == [(1, 0), (2, 0), (3, 1)]
    assert main([*resume, "--epochs", "20"]) == 2
    assert "stopped early at epoch 3" in one_error_line(capsys)
    assert len(read_history(tmp_path / "r")) == 3


def test_early_stopping_in_local_mode_stops_its_own_loop(ray_session, real_data_dir, tmp_path):
    result = train(TrainConfig(epochs=6, lr=1e-12, hidden=(32,), validation=1000, early_stopping=1,
                               storage_path=str(tmp_path), name="r", data_dir=str(real_data_dir)), local_mode=True)
    assert [(row["epoch"], row["stopped_early"]) for row in result.history] == [(1, 0), (2, 1)]
    assert [r["stopped_early"] for r in read_history(tmp_path / "r")] == ["0", "1"]
