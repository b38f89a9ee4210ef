"""Batch scoring: the test set, image folders and Parquet in; the SPEC's Parquet predictions out."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import fmnist
from conftest import REPO, png_bytes, assert_float32_close, assert_same_classes, local_env, one_error_line
from fmnist.cli import main
from fmnist.core.checkpoints import CONFIG_FILE, METRICS_FILE, MODEL_FILE
from fmnist.core.data import load_test_split
from fmnist.core.images import MAX_IMAGE_PIXELS
from fmnist.core.model import CLASS_NAMES, normalize

SPEC_COLUMNS = [
    ("id", pa.int64()), ("path", pa.string()), ("label", pa.int64()), ("prediction", pa.int64()),
    ("predicted_class", pa.string()), ("confidence", pa.float32()), ("probabilities", pa.list_(pa.float32())),
]


@pytest.fixture(scope="module")
def checkpoint(trained_run) -> Path:
    return Path(trained_run.best_checkpoint)


@pytest.fixture(scope="module")
def fashion_test_set(real_data_dir) -> tuple[np.ndarray, np.ndarray]:
    return load_test_split(real_data_dir)


@pytest.fixture(scope="module")
def reference(checkpoint, fashion_test_set) -> np.ndarray:
    """Log-probabilities of the test set from a plain in-process forward pass of the checkpoint."""
    images, _ = fashion_test_set
    model = fmnist.load_model(checkpoint)
    config = model.config
    with torch.no_grad():
        return model(normalize(torch.from_numpy(images.copy()), config)).numpy()


def score(*args: str | Path) -> int:
    return main(["score", *map(str, args)])


def read_predictions(directory: Path) -> pa.Table:
    return pq.read_table(directory).sort_by("id")


def probabilities(predictions: pa.Table) -> np.ndarray:
    return np.stack(predictions["probabilities"].to_numpy(zero_copy_only=False))


def test_test_set_predictions_match_the_model_and_the_training_accuracy(
        ray_session, trained_run, checkpoint, fashion_test_set, reference, real_data_dir, tmp_path, capsys):
    out = tmp_path / "predictions"
    # A run directory means its best checkpoint.
    assert score("--checkpoint", trained_run.run_dir, "--output", out, "--data-dir", real_data_dir,
                 "--batch-size", 700) == 0

    parquet_schema = pq.read_schema(next(out.glob("*.parquet")))
    assert [(f.name, f.type) for f in parquet_schema] == SPEC_COLUMNS
    assert parquet_schema.metadata[b"fmnist.checkpoint"] == str(checkpoint).encode()
    predictions = read_predictions(out)
    _, labels = fashion_test_set
    assert predictions["id"].to_pylist() == list(range(10_000))
    assert predictions["label"].to_numpy().tolist() == labels.tolist()
    assert predictions["path"].null_count == 10_000
    prediction = predictions["prediction"].to_numpy()
    near_ties = assert_same_classes(prediction, reference)
    probs = probabilities(predictions)
    assert_float32_close(probs, np.exp(reference))
    assert_float32_close(probs.sum(axis=1), 1)
    assert (predictions["confidence"].to_numpy() == probs.max(axis=1)).all()
    assert predictions["predicted_class"].to_pylist() == [CLASS_NAMES[p] for p in prediction]

    accuracy = (prediction == labels).mean()
    # Training measured it with torch; a near-tie may round the other way here.
    assert accuracy == pytest.approx(json.loads((checkpoint / METRICS_FILE).read_text())["test_accuracy"],
                                     abs=1e-12 + near_ties / 10_000)
    assert accuracy == pytest.approx(trained_run.best_accuracy, abs=1e-12 + near_ties / 10_000)
    summary = capsys.readouterr().out
    assert "10,000 images" in summary and str(out) in summary


def test_image_folder_with_class_subfolders(ray_session, checkpoint, fashion_test_set, reference, tmp_path):
    images, labels = fashion_test_set
    folder = tmp_path / "images"
    expected = {}  # path -> (test index, label from its folder or None)
    for i in range(60):
        # Class folders as a user names them ('/' is not allowed in a folder name); 10 loose files.
        sub = folder / CLASS_NAMES[labels[i]].replace("/", "_") if i < 50 else folder
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(sub / f"{i:03d}.png")
        expected[str(sub / f"{i:03d}.png")] = (i, int(labels[i]) if i < 50 else None)
    # Any size and colour mode is converted; not byte-for-byte the original, so not in `expected`.
    Image.fromarray(images[0]).convert("RGB").resize((56, 56)).save(folder / "big_rgb.jpg")

    out = tmp_path / "predictions"
    assert score("--checkpoint", checkpoint, "--input", folder, "--output", out, "--batch-size", 16) == 0

    predictions = read_predictions(out)
    paths = predictions["path"].to_pylist()
    assert paths == sorted([*expected, str(folder / "big_rgb.jpg")])
    assert predictions["id"].to_pylist() == list(range(61))  # position in sorted path order
    rows = [paths.index(p) for p in expected]
    test_index = [i for i, _ in expected.values()]
    assert predictions["label"].take(rows).to_pylist() == [label for _, label in expected.values()]
    assert_same_classes(predictions["prediction"].to_numpy()[rows], reference[test_index])
    assert_float32_close(probabilities(predictions)[rows], np.exp(reference[test_index]))


def test_numbered_class_folders_label_their_images_and_other_folders_are_named_once(
        ray_session, checkpoint, fashion_test_set, tmp_path, capsys):
    images, labels = fashion_test_set
    folder = tmp_path / "images"
    expected = {}  # path -> label
    for i in range(30):
        # Folders 0-9, as exports of Fashion-MNIST name them; then two folders that name no class.
        sub = folder / ("train" if i >= 25 else "misc" if i >= 20 else str(labels[i]))
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(sub / f"{i:03d}.png")
        expected[str(sub / f"{i:03d}.png")] = int(labels[i]) if i < 20 else None

    out = tmp_path / "predictions"
    assert score("--checkpoint", checkpoint, "--input", folder, "--output", out) == 0

    predictions = read_predictions(out)
    assert dict(zip(predictions["path"].to_pylist(), predictions["label"].to_pylist())) == expected
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "misc, train" in warnings[0] and "unlabelled" in warnings[0], warnings


def test_a_single_image_file_is_one_row(ray_session, checkpoint, fashion_test_set, reference, tmp_path):
    images, _ = fashion_test_set
    Image.fromarray(images[7]).save(tmp_path / "one.png")

    out = tmp_path / "predictions"
    assert score("--checkpoint", checkpoint, "--input", tmp_path / "one.png", "--output", out) == 0

    predictions = read_predictions(out)
    assert predictions.num_rows == 1
    assert predictions["path"].to_pylist() == [str(tmp_path / "one.png")] and predictions["label"][0].as_py() is None
    assert_same_classes(predictions["prediction"].to_numpy(), reference[7:8])
    assert_float32_close(probabilities(predictions)[0], np.exp(reference[7]))


@pytest.mark.parametrize("encoding", ["pixels", "png"])
def test_parquet_input(ray_session, checkpoint, fashion_test_set, reference, tmp_path, encoding):
    images, labels = fashion_test_set
    source = tmp_path / "input"
    source.mkdir()
    if encoding == "pixels":
        # No id column: ids are row positions across the files in sorted order. Small row groups,
        # and pixels as a fixed-size list in one file, as a list in the other.
        pixels = pa.FixedSizeListArray.from_arrays(pa.array(images[:300].reshape(-1)), 784)
        table = pa.table({"image": pixels, "label": labels[:300]})
        pq.write_table(table.slice(0, 120), source / "a.parquet", row_group_size=50)
        b = table.slice(120)
        pq.write_table(b.set_column(0, "image", b["image"].cast(pa.list_(pa.uint8()))), source / "b.parquet",
                       row_group_size=50)
        ids, test_index, expected_labels = list(range(300)), list(range(300)), labels[:300].tolist()
    else:
        test_index = list(range(100, 200))
        ids = [5000 + i for i in test_index]
        table = pa.table({"id": pa.array(ids, pa.int32()), "image": [png_bytes(images[i]) for i in test_index]})
        pq.write_table(table, source / "images.parquet")
        expected_labels = [None] * 100
        source = source / "images.parquet"  # a single file as --input

    out = tmp_path / "predictions"
    assert score("--checkpoint", checkpoint, "--input", source, "--output", out, "--batch-size", 64) == 0

    predictions = read_predictions(out)
    assert predictions["id"].to_pylist() == ids
    assert predictions["label"].to_pylist() == expected_labels
    assert_same_classes(predictions["prediction"].to_numpy(), reference[test_index])
    assert_float32_close(probabilities(predictions), np.exp(reference[test_index]))


def _copy_checkpoint(checkpoint: Path, tmp_path: Path, file: str, content: bytes) -> Path:
    """A copy of ``checkpoint`` with ``file`` replaced by ``content``."""
    copy = tmp_path / "checkpoint_copy"
    shutil.copytree(checkpoint, copy)
    (copy / file).write_bytes(content)
    return copy


def _write_parquet(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


def _folder_with_a_broken_image(tmp_path: Path, images: np.ndarray) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(images[i]).save(folder / f"{i:03d}.png")
    (folder / "020_broken.png").write_bytes(png_bytes(images[0])[:60])  # truncated
    return folder


BAD_INPUTS = ["missing checkpoint", "corrupt checkpoint", "config not matching the weights", "empty image folder",
              "Parquet without rows", "Parquet without an image column", "Parquet files of mixed image encodings",
              "unreadable image file", "checkpoint that is a file", "weights that are not a state dict",
              "config with a negative width"]


def _bad_input(case: str, tmp_path: Path, checkpoint: Path, images: np.ndarray) -> tuple[list, str]:
    """The options that make ``case``, and what the error line must name."""
    if case == "missing checkpoint":
        return ["--checkpoint", tmp_path / "nowhere"], "nowhere"
    if case == "corrupt checkpoint":  # cut short, as by a full disk
        truncated = (checkpoint / MODEL_FILE).read_bytes()[:5000]
        return ["--checkpoint", _copy_checkpoint(checkpoint, tmp_path, MODEL_FILE, truncated)], MODEL_FILE
    if case == "config not matching the weights":
        config = json.loads((checkpoint / CONFIG_FILE).read_text())
        config["hidden"] = [300, 128, 64]
        copy = _copy_checkpoint(checkpoint, tmp_path, CONFIG_FILE, json.dumps(config).encode())
        return ["--checkpoint", copy], CONFIG_FILE
    if case == "empty image folder":
        (tmp_path / "empty").mkdir()
        return ["--checkpoint", checkpoint, "--input", tmp_path / "empty"], str(tmp_path / "empty")
    if case == "Parquet without rows":
        empty = _write_parquet(tmp_path / "none.parquet", pa.table({"image": pa.array([], pa.binary())}))
        return ["--checkpoint", checkpoint, "--input", empty], "none.parquet"
    if case == "Parquet without an image column":
        no_image = _write_parquet(tmp_path / "pixels.parquet", pa.table({"pixels": [b"x"]}))
        return ["--checkpoint", checkpoint, "--input", no_image], "pixels.parquet has no column 'image'"
    if case == "Parquet files of mixed image encodings":
        (tmp_path / "mixed").mkdir()
        _write_parquet(tmp_path / "mixed" / "a.parquet", pa.table({"image": [png_bytes(images[0])]}))
        pixels = pa.array([images[1].reshape(-1)], pa.list_(pa.uint8()))
        _write_parquet(tmp_path / "mixed" / "b.parquet", pa.table({"image": pixels}))
        return ["--checkpoint", checkpoint, "--input", tmp_path / "mixed"], "b.parquet holds pixel lists"
    if case == "checkpoint that is a file":
        (tmp_path / "model.pt").write_bytes((checkpoint / MODEL_FILE).read_bytes())
        return ["--checkpoint", tmp_path / "model.pt"], "is a file"
    if case == "weights that are not a state dict":
        buffer = io.BytesIO()
        torch.save(torch.zeros(3), buffer)
        return ["--checkpoint", _copy_checkpoint(checkpoint, tmp_path, MODEL_FILE, buffer.getvalue())], MODEL_FILE
    if case == "config with a negative width":
        config = json.loads((checkpoint / CONFIG_FILE).read_text())
        config["hidden"] = [-1]
        copy = _copy_checkpoint(checkpoint, tmp_path, CONFIG_FILE, json.dumps(config).encode())
        return ["--checkpoint", copy], "positive hidden widths"
    assert case == "unreadable image file"
    folder = _folder_with_a_broken_image(tmp_path, images)
    return ["--checkpoint", checkpoint, "--input", folder, "--batch-size", 8], "020_broken.png"


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_naming_it_and_writes_nothing(ray_session, checkpoint, fashion_test_set, tmp_path, capsys, case):
    options, name = _bad_input(case, tmp_path, checkpoint, fashion_test_set[0])
    out = tmp_path / "predictions"
    assert score(*options, "--output", out) == 2
    assert name in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left
    assert not out.exists()


def test_skip_bad_scores_the_rest_and_lists_what_it_skipped(ray_session, checkpoint, fashion_test_set, tmp_path, capsys):
    folder = _folder_with_a_broken_image(tmp_path, fashion_test_set[0])
    (folder / "030_not_an_image.jpg").write_text("hello")
    # 144 million pixels in 140 KB: refused from its header, past MAX_IMAGE_PIXELS, before decoding.
    Image.new("L", (12_000, 12_000)).save(folder / "040_huge.png")
    out = tmp_path / "predictions"
    assert score("--checkpoint", checkpoint, "--input", folder, "--output", out, "--skip-bad") == 0
    assert read_predictions(out).num_rows == 40
    printed = " ".join(capsys.readouterr().out.split())
    assert "Skipped 3" in printed and "020_broken.png" in printed and "030_not_an_image.jpg" in printed
    assert "040_huge.png" in printed and f"12,000 x 12,000 pixels, over the limit of {MAX_IMAGE_PIXELS:,}" in printed


def test_overwrite_never_deletes_the_input_the_checkpoint_or_the_current_directory(
        checkpoint, fashion_test_set, tmp_path, monkeypatch, capsys):
    images, run, elsewhere = tmp_path / "images", tmp_path / "run", tmp_path / "elsewhere"
    images.mkdir()
    for i in range(3):
        Image.fromarray(fashion_test_set[0][i]).save(images / f"{i}.png")
    shutil.copytree(checkpoint, run / "checkpoint_1")
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for output, what in ((images, "--input"), (run, "--checkpoint"), (tmp_path, "--checkpoint"),
                         (".", "the current directory")):
        assert score("--checkpoint", run, "--input", images, "--output", output, "--overwrite") == 2
        assert f"holds {what}" in one_error_line(capsys)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_an_output_that_cannot_be_made_is_refused_before_any_work(checkpoint, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    assert score("--checkpoint", checkpoint, "--output", tmp_path / "a_file" / "predictions") == 2
    assert "cannot write --output" in one_error_line(capsys)
    assert os.listdir(tmp_path) == ["a_file"]


def test_parquet_rows_without_a_usable_image_or_id_are_skipped(ray_session, checkpoint, fashion_test_set, tmp_path, capsys):
    pixels = fashion_test_set[0][:2].reshape(2, -1).tolist()
    table = pa.table({
        "id": pa.array([10, None, 12, 13, 14, 15], pa.int64()),
        "image": pa.array([pixels[0], pixels[1], pixels[0][:100], [None] * 784, None, pixels[1]], pa.list_(pa.uint8())),
    })
    source = _write_parquet(tmp_path / "rows.parquet", table)
    out = tmp_path / "predictions"
    # Batches of 2: the middle one has no usable row at all.
    assert score("--checkpoint", checkpoint, "--input", source, "--output", out, "--skip-bad", "--batch-size", 2) == 0
    assert sorted(read_predictions(out)["id"].to_pylist()) == [10, 15]
    printed = " ".join(capsys.readouterr().out.split())
    for problem in ("has no id", "image id 12 (has 100 pixel values", "image id 13 (has missing pixel values)",
                    "image id 14 (has 0 pixel values"):
        assert problem in printed


def test_output_is_replaced_only_with_overwrite_and_only_by_a_whole_run(
        ray_session, checkpoint, fashion_test_set, tmp_path, capsys):
    out = tmp_path / "predictions"
    out.mkdir()
    (out / "old.parquet").write_text("earlier predictions")
    good = tmp_path / "good"
    good.mkdir()
    for i in range(20):
        Image.fromarray(fashion_test_set[0][i]).save(good / f"{i:02d}.png")

    assert score("--checkpoint", checkpoint, "--input", good, "--output", out) == 2
    assert "--overwrite" in one_error_line(capsys)

    # Fails midway: many batches are scored before the broken image, which sorts after them.
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert score("--checkpoint", checkpoint, "--input", bad, "--output", out, "--overwrite",
                 "--batch-size", 2, "--concurrency", 1) == 2
    assert "zz_broken.png" in one_error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["old.parquet"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    assert score("--checkpoint", checkpoint, "--input", good, "--output", out, "--overwrite") == 0
    assert read_predictions(out).num_rows == 20


@pytest.mark.slow
def test_workflow_script_runs_on_its_own_ray(trained_run, real_data_dir, tmp_path):
    out = tmp_path / "predictions"
    run = subprocess.run(
        [sys.executable, str(REPO / "workflows" / "score.py"), "--checkpoint", trained_run.run_dir,
         "--output", str(out), "--data-dir", str(real_data_dir)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert read_predictions(out).num_rows == 10_000
    assert "10,000 images" in run.stdout and "Traceback" not in run.stderr
    assert "ERROR" not in run.stdout + run.stderr  # Ray's, about model actors' arguments, is gone with them


@pytest.mark.slow
def test_on_cpus_one_task_reads_scores_and_writes_each_block(trained_run, fashion_test_set, tmp_path):
    """On one's own Ray, the model runs in the read's and the write's Ray Data task (the plan Ray
    prints with --verbose): blocks never cross the object store, and no model actor is made."""
    images, labels = fashion_test_set
    pq.write_table(pa.table({"image": pa.FixedSizeListArray.from_arrays(pa.array(images[:3000].reshape(-1)), 784),
                             "label": labels[:3000]}), tmp_path / "input.parquet", row_group_size=1000)
    run = subprocess.run(
        [sys.executable, str(REPO / "workflows" / "score.py"), "--checkpoint", trained_run.run_dir,
         "--input", str(tmp_path / "input.parquet"), "--output", str(tmp_path / "predictions"), "--verbose"],
        capture_output=True, text=True, timeout=300, env=local_env(),
    )
    assert run.returncode == 0, run.stderr
    assert "TaskPoolMapOperator[Read_ParquetRowGroups->MapBatches(_score_on_cpu)->Write]" in run.stdout + run.stderr
    assert read_predictions(tmp_path / "predictions")["id"].to_pylist() == list(range(3000))


def test_cpu_scoring_modules_import_without_torch():
    # A CPU scoring task's worker process imports fmnist.score.scoring (and what it imports) to run it;
    # torch would cost every such process 1.5 s of its start (bench/RESULTS.md, "Batch scoring").
    code = "import sys, fmnist.score.scoring; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.strip() == "[]"
