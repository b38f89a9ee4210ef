"""evaluate --mistakes: the picture's tiles are the images the model got wrong, for every input kind."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fmnist.cli import main
from fmnist.core.data import load_test_split
from fmnist.core.model import CLASS_NAMES
from fmnist.evaluate.metrics import evaluate_predictions
from fmnist.evaluate.mistakes import PER_PAIR, worst_mistakes
from fmnist.score.scoring import PREDICTIONS_SCHEMA

from conftest import PNG_MAGIC, one_error_line
from test_evaluation import committed, realistic_predictions


def write_scored(directory: Path, ids, labels, predictions, paths=None, seed: int = 0) -> Path:
    """Predictions as 'fmnist score' writes them, with confidences that differ from row to row."""
    n = len(ids)
    confidence = np.random.default_rng(seed).uniform(0.3, 1.0, n).astype(np.float32)
    probabilities = np.tile(((1 - confidence) / 9)[:, None], (1, 10)).astype(np.float32)
    probabilities[np.arange(n), predictions] = confidence
    table = pa.table({
        "id": pa.array(ids, pa.int64()),
        "path": pa.array(paths if paths is not None else [None] * n, pa.string()),
        "label": pa.array(labels, pa.int64()),
        "prediction": pa.array(predictions, pa.int64()),
        "predicted_class": [CLASS_NAMES[p] for p in predictions],
        "confidence": pa.array(confidence),
        "probabilities": pa.array(list(probabilities), pa.list_(pa.float32())),
    }, schema=PREDICTIONS_SCHEMA)
    return committed(directory, {"part-000.parquet": table})


def find_tile(picture: np.ndarray, image: np.ndarray) -> tuple[int, int] | None:
    """Where in ``picture`` (RGB) the 28x28 ``image``, enlarged by a whole factor, appears pixel for pixel."""
    for scale in (4, 3, 5, 2, 6):
        tile = np.kron(image, np.ones((scale, scale), np.uint8))
        first = tile[0].tobytes()
        for y in range(picture.shape[0] - tile.shape[0] + 1):
            row = picture[y, :, 0].tobytes()
            x = row.find(first)
            while x != -1:
                window = picture[y:y + tile.shape[0], x:x + tile.shape[1]]
                if window.shape[:2] == tile.shape and all((window[:, :, c] == tile).all() for c in range(3)):
                    return y, x
                x = row.find(first, x + 1)
    return None


def assert_tiles_are(png_file: Path, images: list[np.ndarray]) -> None:
    """The picture shows every one of ``images``, in reading order (row by row, left to right)."""
    assert png_file.read_bytes()[:8] == PNG_MAGIC
    with Image.open(png_file) as png:
        picture = np.asarray(png.convert("RGB"))
    places = [find_tile(picture, image) for image in images]
    assert None not in places, f"tiles not found: {[i for i, p in enumerate(places) if p is None]}"
    assert places == sorted(places)


@pytest.fixture(scope="module")
def fashion_test_set(real_data_dir):
    return load_test_split(real_data_dir)


def chosen(predictions: Path):
    return [m for _, mistakes in worst_mistakes(predictions, evaluate_predictions(predictions)) for m in mistakes]


def test_test_set_mistakes_show_the_test_images_by_id(fashion_test_set, real_data_dir, tmp_path, capsys):
    images, labels = fashion_test_set
    _, predicted = realistic_predictions(real_data_dir)
    predictions = write_scored(tmp_path / "p", np.arange(len(labels)), labels, predicted)
    out = tmp_path / "mistakes.png"

    assert main(["evaluate", str(predictions), "--mistakes", str(out), "--data-dir", str(real_data_dir)]) == 0

    assert f"mistakes: {out}" in capsys.readouterr().out
    picked = chosen(predictions)
    assert len(picked) == 4 * PER_PAIR
    first_pair = {picked[0].label, picked[0].prediction}
    assert first_pair == {CLASS_NAMES.index("Shirt"), CLASS_NAMES.index("T-shirt/top")}
    # The pair's most confident mistakes (either way), most confident first.
    confidence = pq.read_table(predictions)["confidence"].to_numpy()
    pair = (labels != predicted) & np.isin(labels, list(first_pair)) & np.isin(predicted, list(first_pair))
    expected = np.flatnonzero(pair)[np.argsort(-confidence[pair], kind="stable")][:PER_PAIR]
    assert [m.id for m in picked[:PER_PAIR]] == expected.tolist()
    assert_tiles_are(out, [images[m.id] for m in picked])


def _image_folder(root: Path, images, labels, count: int) -> list[str]:
    paths = []
    for i in range(count):
        folder = root / CLASS_NAMES[labels[i]].replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
    for file in sorted(root.rglob("*.png"), key=str):  # ids as scoring numbers them: sorted path order
        paths.append(str(file))
    return paths


def test_image_folder_mistakes_show_the_files(fashion_test_set, tmp_path, capsys):
    images, labels = fashion_test_set
    root = tmp_path / "images"
    paths = _image_folder(root, images, labels, 60)
    index = [int(Path(p).stem) for p in paths]
    truth = labels[index]
    predicted = np.where(np.arange(60) % 3 == 0, (truth + 1) % 10, truth)  # a third wrong
    predictions = write_scored(tmp_path / "p", np.arange(60), truth, predicted, paths=paths)

    # By the files the predictions name, and by id through the folder given as --images.
    for extra in ([], ["--images", str(root)]):
        out = tmp_path / f"mistakes{len(extra)}.png"
        assert main(["evaluate", str(predictions), "--mistakes", str(out), *extra]) == 0
        assert_tiles_are(out, [images[index[m.id]] for m in chosen(predictions)])


def test_parquet_mistakes_show_the_inputs_image_column_by_id(fashion_test_set, tmp_path, capsys):
    images, labels = fashion_test_set
    rows = np.random.default_rng(1).permutation(200)
    ids = 5_000 + rows * 7  # ids that are not positions
    source = tmp_path / "input.parquet"
    pq.write_table(pa.table({
        "id": pa.array(ids, pa.int64()),
        "label": pa.array(labels[rows], pa.int64()),
        "image": pa.array(list(images[rows].reshape(-1, 784)), pa.list_(pa.uint8())),
    }), source, row_group_size=64)
    predicted = np.where(np.arange(200) % 4 == 0, (labels[rows] + 2) % 10, labels[rows])
    order = np.random.default_rng(2).permutation(200)  # predictions in another order than the input
    predictions = write_scored(tmp_path / "p", ids[order], labels[rows][order], predicted[order])
    out = tmp_path / "mistakes.png"

    assert main(["evaluate", str(predictions), "--mistakes", str(out), "--images", str(source)]) == 0

    by_id = dict(zip(ids.tolist(), images[rows]))
    assert_tiles_are(out, [by_id[m.id] for m in chosen(predictions)])


def test_no_mistakes_is_a_picture_that_says_so(tmp_path, capsys):
    predictions = write_scored(tmp_path / "p", np.arange(3), [1, 2, 3], [1, 2, 3])
    out = tmp_path / "m.png"
    assert main(["evaluate", str(predictions), "--mistakes", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC


def _parquet_input_with_other_ids(tmp_path):
    pq.write_table(pa.table({"id": pa.array([0, 1, 2], pa.int64()), "label": pa.array([9, 9, 9], pa.int64()),
                             "image": pa.array([[0] * 784] * 3, pa.list_(pa.uint8()))}), tmp_path / "other.parquet")


@pytest.mark.parametrize("options, words", [
    (lambda t: ["--images", str(t / "nowhere")], "--images"),
    (lambda t: ["--images", str(t / "other.parquet")], "has no image with id"),
    (lambda t: ["--images", "test"], "but the predictions say"),
    (lambda t: ["--mistakes", str(t / "missing-dir" / "m.png")], "argument --mistakes: directory"),
    (lambda t: ["--plot", str(t / "out" / "m.png")], "--plot and --mistakes name the same file"),
])
def test_bad_paths_are_one_error_line_and_exit_2(real_data_dir, tmp_path, capsys, options, words):
    # Predictions of a Parquet input (ids 100..102) whose labels are not the test set's.
    predictions = write_scored(tmp_path / "p", [100, 101, 102], [3, 3, 3], [4, 4, 4])
    _parquet_input_with_other_ids(tmp_path)
    (tmp_path / "out").mkdir()
    argv = ["evaluate", str(predictions), "--data-dir", str(real_data_dir), "--mistakes", str(tmp_path / "out" / "m.png"),
            *options(tmp_path)]

    assert main(argv) == 2

    captured = capsys.readouterr()
    assert captured.out == ""  # no report printed before the error
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and words in captured.err
    assert os.listdir(tmp_path / "out") == []


def test_images_without_mistakes_and_predictions_without_confidence_are_refused(tmp_path, capsys):
    predictions = write_scored(tmp_path / "p", [0], [1], [2])
    assert main(["evaluate", str(predictions), "--images", "test"]) == 2
    assert "--images is for --mistakes" in one_error_line(capsys)
    bare = committed(tmp_path / "bare", {
        "part-000.parquet": pa.table({"label": pa.array([1], pa.int64()), "prediction": pa.array([2], pa.int64())})})
    assert main(["evaluate", str(bare), "--mistakes", str(tmp_path / "m.png")]) == 2
    assert "no 'id' column" in one_error_line(capsys)
    assert not (tmp_path / "m.png").exists()
